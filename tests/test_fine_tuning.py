"""Learning from what is trained: `plan --like` (adopt a model's network), then `train --pretrained`, and
`train --continue` after cases were added. Real phantoms, tiny budgets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from autoseg.core.checkpoint import load_checkpoint, save_checkpoint
from autoseg.core.plan import load_plan, plan_digest, save_plan
from autoseg.phantoms import synthetic

TINY = ["--iterations", "1", "--val-iterations", "1", "--workers", "0", "--device", "cpu", "--no-progress", "--no-tta"]


#: a convolution (weight and bias) of the encoder, which the continuation test marks.
MARKED = ("encoder.1.0.0.weight", "encoder.1.0.0.bias")


def events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def source_work(tmp_path: Path, run_cli) -> Path:
    """A planned (untrained) brain phantom at 1 mm."""
    dataset = synthetic.write_msd_brain(tmp_path / "Public", 4, shape=(32, 40, 36))
    result = run_cli("plan", "-d", dataset, "-w", tmp_path / "public_work", "-c", "3d_fullres", "--no-progress")
    assert result.exit_code == 0, result.output
    return tmp_path / "public_work"


def test_plan_like_adopts_topology_and_spacing_and_warns_about_the_spacing(source_work, tmp_path, run_cli):
    source = load_plan(source_work / "Public" / "plans.json")
    hospital = synthetic.write_msd_brain(tmp_path / "Hospital", 4, shape=(12, 30, 28), spacing=(2.5, 1.0, 1.0), seed=3)
    own = run_cli("plan", "-d", hospital, "-w", tmp_path / "own", "--no-preprocess", "--no-progress")
    assert own.exit_code == 0, own.output
    native = load_plan(tmp_path / "own" / "Hospital" / "plans.json").configurations["3d_fullres"]

    result = run_cli(
        "plan", "-d", hospital, "-w", tmp_path / "work", "--like", source_work, "--no-preprocess", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "work" / "Hospital" / "plans.json")
    adopted, theirs = plan.configurations["3d_fullres"], source.configurations["3d_fullres"]
    assert list(plan.configurations) == ["3d_fullres"]  # only what the model has, not a fresh 2d
    assert adopted.network == theirs.network and adopted.spacing == theirs.spacing
    assert (native.network, native.spacing) != (theirs.network, theirs.spacing)  # the data alone plan otherwise
    strides = [[s[a] for s in adopted.network.strides] for a in range(3)]
    for axis, (patch, limit) in enumerate(zip(adopted.patch_size, theirs.patch_size)):
        total = int(torch.tensor(strides[axis]).prod())
        assert patch <= limit and patch % total == 0
    assert adopted.patch_size[0] < theirs.patch_size[0]  # 12 slices at 2.5 mm = 30 at 1 mm: clipped to the data
    assert plan.transpose_forward == source.transpose_forward
    assert plan.planned_like.dataset == "Public" and plan.planned_like.plan_digest == plan_digest(source)
    assert plan.channel_names == source.channel_names and adopted.normalization == native.normalization
    assert "2.5x finer" in " ".join(result.output.split())  # the model's 1 mm against the data's 2.5 mm
    assert "network and spacing taken from" in result.output


def test_plan_like_refuses_2d_against_3d_and_unmappable_channels(source_work, tmp_path, run_cli):
    flat = synthetic.write_msd_brain(tmp_path / "Flat", 3, shape=(1, 40, 36))
    result = run_cli("plan", "-d", flat, "-w", tmp_path / "flat_work", "--like", source_work, "--no-progress")
    assert result.exit_code == 1
    assert "planned for 3D images" in result.output and "Flat has 2D images" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "flat_work").exists()

    ct = synthetic.write_nnunet_ct(tmp_path / "Dataset009_CT", 3)
    result = run_cli("plan", "-d", ct, "-w", tmp_path / "nothing_work", "--like", tmp_path / "nothing", "--no-progress")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_plan_like_across_modalities_maps_a_channel_or_starts_from_the_mean(source_work, tmp_path, run_cli):
    """A CT task on a brain MRI model: no channel in common is planned, with a note; --channel-map CT=FLAIR
    is recorded in the plan for `train --pretrained`; a map naming an unknown channel is refused."""
    ct = synthetic.write_nnunet_ct(tmp_path / "Dataset009_CT", 3)
    like = ("plan", "-d", ct, "--like", source_work, "--no-preprocess", "--no-progress")
    result = run_cli(*like, "-w", tmp_path / "mean_work")
    assert result.exit_code == 0, result.output
    assert "starts each one's input filters from the mean of the model's" in " ".join(result.output.split())
    plan = load_plan(tmp_path / "mean_work" / "Dataset009_CT" / "plans.json")
    assert plan.planned_like.channel_map == {}
    assert (
        "channel_map"
        not in json.loads((tmp_path / "mean_work" / "Dataset009_CT" / "plans.json").read_text())["planned_like"]
    )
    result = run_cli(*like, "-w", tmp_path / "mapped_work", "--channel-map", "ct=flair")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "mapped_work" / "Dataset009_CT" / "plans.json")
    assert plan.planned_like.channel_map == {"CT": "FLAIR"}
    assert "channel 'CT' takes the model's 'FLAIR' input filters" in " ".join(result.output.split())
    for bad, message in ((["--channel-map", "CT=ADC"], "not channels of the model"), (["--channel-map", "CT"], "")):
        refused = run_cli(*like, "-w", tmp_path / "bad_work", *bad)
        assert refused.exit_code in (1, 2) and "Traceback" not in refused.output, refused.output
        assert message in refused.output and not (tmp_path / "bad_work").exists()
    no_like = run_cli("plan", "-d", ct, "-w", tmp_path / "bad_work", "--channel-map", "CT=FLAIR", "--no-progress")
    assert no_like.exit_code == 2 and "--like" in no_like.output


@pytest.mark.slow
def test_plan_like_then_pretrained_loads_every_weight(source_work, tmp_path, run_cli):
    """Other image sizes and spacing: planned on its own, the network differs and --pretrained is refused;
    planned --like the exported model, every weight loads."""
    trained = run_cli("train", "-w", source_work, "--fold", "0", "--epochs", "1", "--no-validate", *TINY)
    assert trained.exit_code == 0, trained.output
    archive = tmp_path / "public.zip"
    assert run_cli("export", "-w", source_work, "-o", archive, "--no-onnx").exit_code == 0
    hospital = synthetic.write_msd_brain(tmp_path / "Hospital", 3, shape=(16, 30, 28), spacing=(2.0, 1.2, 1.2), seed=5)
    for work, like in ((tmp_path / "own", []), (tmp_path / "like", ["--like", archive])):
        planned = run_cli("plan", "-d", hospital, "-w", work, "-c", "3d_fullres", "--no-progress", *like)
        assert planned.exit_code == 0, planned.output

    refused = run_cli(
        "train", "-w", tmp_path / "own", "--fold", "0", "--epochs", "1", "--no-validate", "--pretrained", archive, *TINY
    )
    assert refused.exit_code == 1 and "plan --like" in refused.output

    result = run_cli(
        "train",
        "-w",
        tmp_path / "like",
        "--fold",
        "0",
        "--epochs",
        "1",
        "--no-validate",
        "--pretrained",
        archive,
        *TINY,
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "like" / "Hospital" / "models" / "3d_fullres" / "fold_0"
    loaded = next(e for e in events(folder) if e.get("event") == "pretrained")
    n_tensors = len(load_checkpoint(folder / "checkpoint_final.pt")["weights"])
    assert loaded["loaded"] == n_tensors and not loaded["adapted"] and not loaded["reinitialised"]


def test_continue_needs_a_finished_fold(source_work, run_cli):
    result = run_cli("train", "-w", source_work, "--fold", "1", "--continue", "--epochs", "1", *TINY)
    assert result.exit_code == 1 and "has no checkpoint_final.pt" in result.output and "Traceback" not in result.output
    assert not (source_work / "Public" / "models").exists()
    clash = run_cli("train", "-w", source_work, "--fold", "1", "--continue", "--pretrained", source_work, *TINY)
    assert clash.exit_code == 2 and "--continue" in clash.output


@pytest.mark.slow
def test_continue_after_adding_cases_starts_from_the_final_weights(source_work, tmp_path, run_cli):
    from autoseg.workflows.continuation import continue_fold

    dataset = tmp_path / "Public"
    trained = run_cli("train", "-w", source_work, "--fold", "0", "--epochs", "2", "--no-validate", *TINY)
    assert trained.exit_code == 0, trained.output
    folder = source_work / "Public" / "models" / "3d_fullres" / "fold_0"
    # Mark the final weights: a convolution scaled by 3 computes the same (instance norm follows it), but no
    # network started from scratch or from another checkpoint has it.
    payload = load_checkpoint(folder / "checkpoint_final.pt")
    for name in MARKED:
        payload["weights"][name] = payload["weights"][name] * 3
    save_checkpoint(folder / "checkpoint_final.pt", payload)
    old = payload["weights"]
    splits_before = json.loads((source_work / "Public" / "splits.json").read_text())

    synthetic.write_msd_brain(dataset, 6, shape=(32, 40, 36))  # the same 4 cases and 2 new ones
    replanned = run_cli("plan", "-d", dataset, "-w", source_work, "-c", "3d_fullres", "--no-progress")
    assert replanned.exit_code == 0, replanned.output
    splits_after = json.loads((source_work / "Public" / "splits.json").read_text())
    assert set(splits_before["folds"][0]["val"]) <= set(splits_after["folds"][0]["val"])  # stable

    # A continuation stopped after its first epoch (as a kill would) ...
    class Stop(Exception):
        pass

    def stop(epoch: int, entry: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        continue_fold(
            workdir=source_work,
            fold="0",
            epochs=2,
            iterations=1,
            val_iterations=1,
            workers=0,
            device="cpu",
            tta=False,
            show_progress=False,
            on_epoch_end=stop,
        )
    assert torch.equal(
        load_checkpoint(folder / "checkpoint_final.pt")["weights"]["decoder.0.0.0.weight"], old["decoder.0.0.0.weight"]
    )  # the fold's model stays the old one meanwhile
    started = next(e for e in events(folder) if e.get("event") == "pretrained")
    assert started["loaded"] == len(old) and not started["adapted"] and not started["reinitialised"]

    # ... resumes at its second epoch when run again, and reports the Dice before and after.
    result = run_cli("train", "-w", source_work, "--fold", "0", "--continue", "--epochs", "2", *TINY)
    assert result.exit_code == 0, result.output
    starts = [e for e in events(folder) if e.get("event") == "start"]
    assert [s["start_epoch"] for s in starts] == [0, 1]
    start = starts[-1]
    assert (
        start["settings"]["initial_lr"] == pytest.approx(1e-3) and "checkpoint_final" in start["settings"]["pretrained"]
    )
    assert "validation Dice before --continue:" in result.output and "after --continue:" in result.output
    record = json.loads((folder / "continue.json").read_text())
    assert record["status"] == "done" and record["before"].keys() == record["after"].keys()
    before = json.loads((folder / "validation_before_continue" / "summary.json").read_text())
    assert sorted(before["cases"]) == splits_after["folds"][0]["val"]
    assert list(folder.glob("log_before_continue_*.jsonl"))

    new = load_checkpoint(folder / "checkpoint_final.pt")["weights"]
    assert load_checkpoint(folder / "checkpoint_final.pt")["settings"]["pretrained"] == record["source"]
    assert not all(torch.equal(new[k], old[k]) for k in old)  # trained, a small step away from the marked weights
    weight = MARKED[0]
    assert (new[weight] - old[weight]).abs().max() < 0.05 < (old[weight] / 3 - old[weight]).abs().max()

    # The plan's topology changed since: refused, with nothing trained.
    plan = load_plan(source_work / "Public" / "plans.json")
    config = plan.configurations["3d_fullres"]
    smaller = dataclasses.replace(config.network, features_per_stage=[16] * config.network.n_stages)
    save_plan(
        source_work / "Public" / "plans.json",
        dataclasses.replace(plan, configurations={"3d_fullres": dataclasses.replace(config, network=smaller)}),
    )
    refused = run_cli("train", "-w", source_work, "--fold", "0", "--continue", "--epochs", "1", *TINY)
    assert refused.exit_code == 1 and "topology changed" in refused.output


#: A small version of benchmarks/bench_fine_tune.py (figures in docs/performance.md, "Fine-tuning").
SMALL = {"shape": (24, 28, 24), "spacing": (4.0, 4.0, 4.0)}
HOSPITAL = {"channels": ("T2w", "FLAIR", "T1gd"), "labels": {"edema": [1], "tumour core": [2, 3]}}
BUDGET = [
    "--iterations",
    "10",
    "--val-iterations",
    "1",
    "--workers",
    "0",
    "--device",
    "cpu",
    "--no-progress",
    "--no-validate",
    "--fold",
    "all",
]


def held_out_dice(run_cli, work: Path, dataset: Path, out: Path) -> dict[str, float]:
    """`autoseg predict` of the held-out cases, then `autoseg evaluate`: mean Dice per class."""
    predicted = run_cli(
        "predict", "-w", work, "-f", "all", "-i", dataset / "imagesTs", "-o", out, "--device", "cpu", "--no-progress"
    )
    assert predicted.exit_code == 0, predicted.output
    scored = run_cli(
        "evaluate", "-p", out, "-g", dataset / "labelsTs", "--dataset-json", dataset / "dataset.json", "--no-progress"
    )
    assert scored.exit_code == 0, scored.output
    mean = json.loads((out / "summary.json").read_text())["mean"]
    return {name: mean[name]["dice"] for name in HOSPITAL["labels"]}


@pytest.mark.slow
def test_fine_tuned_on_another_protocol_and_other_labels_learns_them_in_a_fifth_of_the_budget(tmp_path, run_cli):
    """A model of the 4-channel, 3-label phantom, planned --like and fine-tuned on a task with three of its
    channels in another order and two other classes, for 3 epochs (a fifth of a 15-epoch budget): the input
    layer is adapted, the heads keep the source's background and edema rows (tumour core starts fresh, and
    the heads train alone for the first epoch), and the held-out cases are segmented.

    The issue's goal (at least the Dice of 5x the budget from scratch) does not hold on phantoms this small:
    measured over seeds 0-2, fine-tuned 0.52-0.81 mean Dice against 0.96 from scratch at the full budget and
    0.61-0.79 from scratch at the same short budget (docs/performance.md). So this checks the weaker property
    that held for every seed (before the heads kept rows): edema (which the source also segments) above 0.6 and both
    classes together above 0.4."""
    public = synthetic.write_msd_brain(tmp_path / "Public", 6, **SMALL)
    hospital = synthetic.write_nnunet_brain(tmp_path / "Dataset502_Hospital", 5, **SMALL, seed=1, n_test=2, **HOSPITAL)
    source, tuned = tmp_path / "public", tmp_path / "tuned"
    for dataset, work, like in ((public, source, []), (hospital, tuned, ["--like", source])):
        planned = run_cli("plan", "-d", dataset, "-w", work, "-c", "3d_fullres", "--no-progress", *like)
        assert planned.exit_code == 0, planned.output
    for work, epochs, extra in ((source, 20, []), (tuned, 15 // 5, ["--pretrained", source])):
        trained = run_cli("train", "-w", work, "--epochs", epochs, *BUDGET, *extra)
        assert trained.exit_code == 0, trained.output

    folder = tuned / "Dataset502_Hospital" / "models" / "3d_fullres" / "fold_all"
    started = next(e for e in events(folder) if e.get("event") == "pretrained")
    heads = [name for name in started["adapted"] if name.startswith("heads.")]
    assert started["adapted"] == ["encoder.0.0.0.weight", *heads] and heads and not started["reinitialised"]
    assert started["classes_copied"] == ["background", "edema"] and started["classes_fresh"] == ["tumour core"]
    n_tensors = len(load_checkpoint(folder / "checkpoint_final.pt")["weights"])
    assert started["loaded"] == n_tensors - 1 - len(heads)
    assert next(e for e in events(folder) if e.get("event") == "start")["settings"]["heads_first_epochs"] == 1
    dice = held_out_dice(run_cli, tuned, hospital, tmp_path / "predictions")
    assert dice["edema"] > 0.6 and sum(dice.values()) / len(dice) > 0.4, dice


def test_heads_first_trains_only_the_heads_and_survives_a_resume(source_work):
    """Classes the source lacks start fresh, so by default (here 2 epochs asked for) only the heads train at
    first: the rest stays the source's exactly, also after a resume in the middle of that phase; then all
    weights train. The warm-up starts after the heads-first phase."""
    from autoseg.model.network import build_network
    from autoseg.training.settings import TrainingSettings, poly_lr
    from autoseg.training.trainer import train_fold
    from autoseg.training.transfer import Pretrained

    plan = load_plan(source_work / "Public" / "plans.json")
    torch.manual_seed(7)
    weights = build_network(plan.configurations["3d_fullres"], 4, 4).state_dict()
    source = Pretrained(weights, tuple(plan.channel_names), ("background", "edema", "necrosis", "cyst"), "model")
    folder = source_work / "Public" / "models" / "3d_fullres" / "fold_0"
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Stop(Exception):
        pass

    def record(stop_at: int | None):
        def on_epoch_end(epoch: int, entry: dict) -> None:
            seen[epoch] = load_checkpoint(folder / "checkpoint_latest.pt")["weights"]
            if epoch == stop_at:
                raise Stop

        return on_epoch_end

    budget = {
        "workdir": source_work,
        "fold": "0",
        "epochs": 3,
        "iterations": 2,
        "val_iterations": 1,
        "workers": 0,
        "device": "cpu",
        "show_progress": False,
    }
    with pytest.raises(Stop):
        train_fold(**budget, pretrained=source, heads_first_epochs=2, on_epoch_end=record(0))
    train_fold(**budget, on_epoch_end=record(None))  # resumed: no --pretrained, no --heads-first-epochs

    start = [e for e in events(folder) if e.get("event") == "start"]
    assert [s["start_epoch"] for s in start] == [0, 1] and start[-1]["settings"]["heads_first_epochs"] == 2
    heads = [k for k in weights if k.startswith("heads.")]
    body = [k for k in weights if k not in heads]
    for epoch in (0, 1):  # the heads-first phase, before and after the resume
        assert all(torch.equal(seen[epoch][k], weights[k]) for k in body)
        assert not all(torch.equal(seen[epoch][k], seen[epoch - 1][k] if epoch else weights[k]) for k in heads)
    assert not any(torch.equal(seen[2][k], seen[1][k]) for k in body if k.endswith(".weight"))  # then all train

    settings = TrainingSettings("d", "c", "0", epochs=10, heads_first_epochs=2, warmup_epochs=2)
    assert poly_lr(settings, 1) > poly_lr(settings, 2) * 2  # the heads at the schedule's rate, then a ramp


def test_heads_first_is_the_default_only_when_head_rows_start_fresh(source_work):
    from autoseg.training.trainer import _fine_tuning
    from autoseg.training.transfer import Pretrained

    plan = load_plan(source_work / "Public" / "plans.json")
    labels = tuple(synthetic.BRAIN_LABELS)
    cli = {"warmup_epochs": None, "freeze_encoder_epochs": None, "heads_first_epochs": None}
    for classes, regions, epochs, expected in (
        (labels, False, 10, 0),
        (labels[:2] + ("cyst",), False, 10, 1),
        (labels, True, 10, 1),
        (labels[:3], False, 1, 0),
    ):
        source = Pretrained({}, tuple(plan.channel_names), classes, "model", regions)
        assert _fine_tuning({**cli, "pretrained": source}, {}, epochs, plan)["heads_first_epochs"] == expected
    assert _fine_tuning({**cli, "pretrained": None}, {}, 10, plan)["heads_first_epochs"] == 0
    assert _fine_tuning({**cli, "pretrained": None}, {"heads_first_epochs": 3}, 10, plan)["heads_first_epochs"] == 3
