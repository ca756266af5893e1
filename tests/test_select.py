"""`autoseg select`: pooled cross-validation, model choice, post-processing decisions, inference.json.

The cross-validation predictions are written by the tests themselves (probabilities built
from the true labels, with known mistakes), so every expected choice is known without training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg.commands.plan import plan_dataset
from autoseg.commands.select import select_model
from autoseg.core.files import read_json, write_json
from autoseg.core.plan import Plan, load_plan
from autoseg.core.workspace import find_dataset
from autoseg.data.evaluation.metrics import dice
from autoseg.data.evaluation.postprocessing import LargestComponent, RelabelSmall, apply_steps
from autoseg.data.io.dataset_record import load_dataset_record
from autoseg.data.io.images import read_label, write_label
from autoseg.data.preprocessing.restore import write_probabilities
from autoseg.inference.instructions import read_instructions
from autoseg.phantoms import synthetic

SHAPE = (20, 24, 22)
Mistake = Callable[[str, np.ndarray], np.ndarray]


def planned(root: Path, writer, configurations: list[str]) -> Path:
    dataset = writer(root / "data", 5, shape=SHAPE)
    work = root / "work"
    plan_dataset(
        dataset_dir=dataset, workdir=work, configurations=configurations, preprocess=False, show_progress=False
    )
    return work


def truths(work: Path) -> dict[str, np.ndarray]:
    spec = load_dataset_record(find_dataset(work).dataset_json)
    return {c.case_id: spec.consecutive_labels(read_label(c.label)[0]) for c in spec.cases}


def label_probabilities(labels: np.ndarray, plan: Plan, confidence: float) -> np.ndarray:
    """Softmax-like probabilities whose argmax is ``labels``."""
    k = plan.num_classes
    probabilities = np.full((k, *labels.shape), (1 - confidence) / (k - 1), np.float32)
    np.put_along_axis(probabilities, labels[None].astype(np.int64), confidence, axis=0)
    return probabilities


def region_probabilities(labels: np.ndarray, plan: Plan) -> np.ndarray:
    """Sigmoid-like probabilities whose regions painted in order give ``labels``."""
    return np.stack([np.where(np.isin(labels, r.labels), 0.9, 0.1) for r in plan.regions]).astype(np.float32)


def write_cv(work: Path, configuration: str, predict: Callable[[str, np.ndarray], np.ndarray]) -> None:
    """Fake full-volume validation of every fold: ``predict(case, truth)`` gives the probabilities."""
    workspace = find_dataset(work)
    plan = load_plan(workspace.plans)
    truth = truths(work)
    for k, fold in enumerate(read_json(workspace.splits)["folds"]):
        folder = workspace.model(configuration, k) / "validation"
        for case_id in fold["val"]:
            write_probabilities(folder / f"{case_id}.npz", predict(case_id, truth[case_id]), plan)
        write_json(folder / "summary.json", {"version": 1})


def shifted(labels: np.ndarray) -> np.ndarray:
    return np.roll(labels, 2, axis=1)


@pytest.fixture
def brain(tmp_path) -> Path:
    return planned(tmp_path, synthetic.write_msd_brain, ["3d_fullres", "2d"])


@pytest.mark.parametrize("better", ["3d_fullres", "2d"])
def test_picks_the_better_configuration_and_the_single_model_on_a_tie(brain, better):
    plan = load_plan(find_dataset(brain).plans)
    worse = "2d" if better == "3d_fullres" else "3d_fullres"
    write_cv(brain, better, lambda case, truth: label_probabilities(truth, plan, 0.95))
    write_cv(brain, worse, lambda case, truth: label_probabilities(shifted(truth), plan, 0.6))

    document = select_model(workdir=brain, postprocessing=False, show_progress=False)

    assert document["configurations"] == [better]
    scores = {tuple(c["configurations"]): c for c in document["candidates"]}
    assert scores[(better,)]["mean_dice"] == pytest.approx(1.0)
    # the confident model wins every voxel of the ensemble: same labels, same score, the single model is kept
    assert scores[("3d_fullres", "2d")]["mean_dice"] == scores[(better,)]["mean_dice"]
    expected = np.mean([np.mean([dice(shifted(t) == v, t == v) for t in truths(brain).values()]) for v in (1, 2, 3)])
    assert scores[(worse,)]["mean_dice"] == pytest.approx(expected)
    assert read_instructions(find_dataset(brain).inference).configurations == (better,)


def test_ensemble_wins_when_the_members_err_in_different_places(brain):
    plan = load_plan(find_dataset(brain).plans)

    def wrong_in(axis_half: slice) -> Mistake:
        def predict(case, truth):
            probabilities = label_probabilities(truth, plan, 0.95)
            spoiled = label_probabilities(np.where(truth > 0, 1, 0), plan, 0.6)  # every tumour voxel called edema
            probabilities[:, axis_half] = spoiled[:, axis_half]
            return probabilities

        return predict

    write_cv(brain, "3d_fullres", wrong_in(slice(0, SHAPE[0] // 2)))
    write_cv(brain, "2d", wrong_in(slice(SHAPE[0] // 2, None)))

    document = select_model(workdir=brain, postprocessing=False, show_progress=False)

    assert document["configurations"] == ["3d_fullres", "2d"]
    assert document["selected"]["mean_dice"] == pytest.approx(1.0)
    assert all(c["mean_dice"] < 0.99 for c in document["candidates"] if len(c["configurations"]) == 1)
    assert document["folds"] == {"3d_fullres": [0, 1, 2, 3, 4], "2d": [0, 1, 2, 3, 4]}


def test_largest_component_adopted_when_it_removes_false_positives(brain):
    plan = load_plan(find_dataset(brain).plans)

    def with_blob(case, truth):
        noisy = truth.copy()
        noisy[:2, :2, :2] = 1  # a corner of the image: far from the tumour, outside the head
        return label_probabilities(noisy, plan, 0.95)

    write_cv(brain, "3d_fullres", with_blob)
    document = select_model(workdir=brain, configurations=["3d_fullres"], show_progress=False)

    first = document["postprocessing_decisions"][0]
    assert first["adopted"] and first["step"] == {"kind": "largest_component", "values": [1, 2, 3]}
    assert first["after"]["dice"]["edema"] > first["before"]["dice"]["edema"]
    assert document["selected"]["mean_dice"] < 1.0
    assert document["final"]["mean_dice"] == pytest.approx(1.0)
    assert read_instructions(find_dataset(brain).inference).postprocessing == (LargestComponent((1, 2, 3)),)


def test_largest_component_rejected_when_it_would_delete_a_true_second_lesion(brain):
    plan = load_plan(find_dataset(brain).plans)
    spec = load_dataset_record(find_dataset(brain).dataset_json)
    for case in spec.cases:  # every truth gets a second, separate lesion in a corner
        label, geometry = read_label(case.label)
        label[:3, :3, :3] = 1
        write_label(label, geometry, case.label)
    write_cv(brain, "3d_fullres", lambda case, truth: label_probabilities(truth, plan, 0.95))

    document = select_model(workdir=brain, configurations=["3d_fullres"], show_progress=False)

    assert document["postprocessing"] == []
    first = document["postprocessing_decisions"][0]
    assert not first["adopted"] and first["after"]["mean_dice"] < first["before"]["mean_dice"]
    edema = next(d for d in document["postprocessing_decisions"] if d["step"]["values"] == [1])
    assert not edema["adopted"]
    assert read_instructions(find_dataset(brain).inference).postprocessing == ()


def test_brats_small_enhancing_tumour_relabelled_as_core(tmp_path):
    work = planned(tmp_path, synthetic.write_brats, ["3d_fullres"])
    plan = load_plan(find_dataset(work).plans)
    spec = load_dataset_record(find_dataset(work).dataset_json)
    for case in spec.cases:  # a real enhancing tumour here is > 10 voxels; a tinier one becomes core (raw 4 -> 1)
        label, geometry = read_label(case.label)
        if 0 < np.count_nonzero(label == 4) <= 10:
            label[label == 4] = 1
            write_label(label, geometry, case.label)
    volumes = {case: int((truth == 3).sum()) for case, truth in truths(work).items()}
    without = [case for case, v in volumes.items() if v == 0]
    assert without and min(v for v in volumes.values() if v) > 10  # some cases have no enhancing tumour

    def speckle(case, truth):
        labels = truth.copy()
        if case in without:  # 4 voxels of enhancing tumour inside the core
            core = np.argwhere(truth == 2)[0]
            labels[tuple(slice(c, c + 2) for c in core[:2]) + (core[2],)] = 3
        return region_probabilities(labels, plan)

    write_cv(work, "3d_fullres", speckle)
    document = select_model(workdir=work, show_progress=False)

    relabel = document["postprocessing_decisions"][-1]
    assert relabel["adopted"] and relabel["step"]["source"] == 3 and relabel["step"]["target"] == 2
    assert 4 < relabel["step"]["max_volume_mm3"] <= min(v for v in volumes.values() if v)
    assert relabel["after"]["dice"]["enhancing tumor"] == pytest.approx(1.0)
    assert relabel["after"]["dice"]["tumor core"] == relabel["before"]["dice"]["tumor core"]
    steps = read_instructions(find_dataset(work).inference).postprocessing
    assert steps == (RelabelSmall(3, 2, relabel["step"]["max_volume_mm3"]),)
    assert document["classes"] == ["whole tumor", "tumor core", "enhancing tumor"]


def test_msd_label_task_gets_the_relabel_rule_adopted_and_rejected(brain):
    """MSD Task01 is planned with labels (1 edema, 2 non-enhancing, 3 enhancing): the rule applies by name."""
    plan = load_plan(find_dataset(brain).plans)
    assert any((truth == 3).any() for truth in truths(brain).values())

    write_cv(brain, "3d_fullres", lambda case, truth: label_probabilities(truth, plan, 0.95))
    document = select_model(workdir=brain, configurations=["3d_fullres"], show_progress=False)
    rejected = document["postprocessing_decisions"][-1]
    assert rejected["step"]["kind"] == "relabel_small" and (rejected["step"]["source"], rejected["step"]["target"]) == (
        3,
        2,
    )
    assert not rejected["adopted"] and document["postprocessing"] == []
    assert min(rejected["thresholds_mm3"].values()) < rejected["before"]["mean_dice"]  # it would erase true ET

    spec = load_dataset_record(find_dataset(brain).dataset_json)
    for index, case in enumerate(spec.cases):  # the first case and any with a tiny enhancing tumour lose it...
        label, geometry = read_label(case.label)
        if index == 0 or 0 < np.count_nonzero(label == 3) <= 10:
            label[label == 3] = 2
            write_label(label, geometry, case.label)

    def speckle(case, truth):  # ...and the model marks a few enhancing voxels in them
        labels = truth.copy()
        if not (truth == 3).any():
            core = np.argwhere(truth == 2)[0]
            labels[tuple(slice(c, c + 2) for c in core[:2]) + (core[2],)] = 3
        return label_probabilities(labels, plan, 0.95)

    write_cv(brain, "3d_fullres", speckle)
    document = select_model(workdir=brain, configurations=["3d_fullres"], show_progress=False)
    adopted = document["postprocessing_decisions"][-1]
    assert adopted["adopted"] and adopted["after"]["dice"]["enhancing tumour"] == pytest.approx(1.0)
    assert read_instructions(find_dataset(brain).inference).postprocessing == (
        RelabelSmall(3, 2, adopted["step"]["max_volume_mm3"]),
    )


def test_incomplete_cross_validation(brain, run_cli):
    plan = load_plan(find_dataset(brain).plans)
    write_cv(brain, "3d_fullres", lambda case, truth: label_probabilities(truth, plan, 0.9))
    write_cv(brain, "2d", lambda case, truth: label_probabilities(truth, plan, 0.9))
    (find_dataset(brain).model("2d", 2) / "validation" / "summary.json").unlink()

    result = run_cli("select", "-w", brain, "-c", "3d_fullres,2d", "--no-progress")
    assert result.exit_code == 1
    assert "2d fold 2 is not validated" in result.output and "autoseg train -c 2d -f 2" in result.output
    assert "no fold's validation set" not in result.output  # the cases are in splits.json, just not validated
    assert not find_dataset(brain).inference.exists()

    result = run_cli("select", "-w", brain, "--no-progress")  # default: incomplete 2d skipped
    assert result.exit_code == 0, result.output
    assert "3d_fullres *" in result.output and "selected 3d_fullres" in result.output
    assert read_instructions(find_dataset(brain).inference).configurations == ("3d_fullres",)


def test_nothing_trained_is_a_clear_error(brain, run_cli):
    result = run_cli("select", "-w", brain, "--no-progress")
    assert result.exit_code == 1 and "no trained configuration" in result.output


# --------------------------------------------------------------------------- end to end, with training


@pytest.fixture(scope="module")
def trained_two_configs(tmp_path_factory) -> tuple[Path, Path]:
    """Two configurations trained for a few iterations and validated (probabilities saved).

    Two folds of two and two cases keep the training short while every case is validated once.
    """
    from autoseg.workflows.fold import train_and_validate

    root = tmp_path_factory.mktemp("select_e2e")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", 4, shape=(24, 28, 26))
    ids = [f"BRATS_{i:03d}" for i in range(1, 5)]
    write_json(dataset / "splits_final.json", [{"train": ids[:2], "val": ids[2:]}, {"train": ids[2:], "val": ids[:2]}])
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres", "2d"], show_progress=False)
    for config in ("3d_fullres", "2d"):
        for fold in ("0", "1"):
            train_and_validate(
                workdir=work,
                configuration=config,
                fold=fold,
                epochs=1,
                iterations=2,
                val_iterations=1,
                workers=0,
                device="cpu",
                tta=False,
                show_progress=False,
            )
    return work, dataset


@pytest.mark.slow
def test_select_then_predict_follows_inference_json(trained_two_configs, tmp_path, run_cli):
    from autoseg.data.evaluation.postprocessing import step_to_json
    from autoseg.data.io.images import read_channels
    from autoseg.data.preprocessing.restore import paint_labels, probabilities_on_input_grid, to_output_values
    from autoseg.inference.predictor import Predictor

    work, dataset = trained_two_configs
    workspace = find_dataset(work)
    with np.load(workspace.model("2d", 0) / "validation" / "BRATS_003.npz") as saved:
        assert saved["probabilities"].dtype == np.float16 and saved["probabilities"].shape == (4, 24, 28, 26)

    result = run_cli("select", "-w", work, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "3d_fullres + 2d" in result.output and "selected" in result.output
    assert read_json(workspace.inference)["folds"] == {
        c: [0, 1] for c in read_json(workspace.inference)["configurations"]
    }

    # a known choice: the ensemble of both, with largest-component post-processing
    steps = [LargestComponent((1, 2, 3))]
    document = read_json(workspace.inference) | {
        "configurations": ["3d_fullres", "2d"],
        "folds": {"3d_fullres": [0], "2d": [0]},
        "postprocessing": [step_to_json(s) for s in steps],
        "bf16": {"accepted": False},
        "openvino": {"accepted": False},
    }  # torch fp32, to compare exactly
    write_json(workspace.inference, document)
    image = dataset / "imagesTr" / "BRATS_004.nii.gz"
    followed, explicit = tmp_path / "followed", tmp_path / "explicit"
    assert (
        run_cli(
            "predict", "-w", work, "-i", image, "-o", followed, "--no-tta", "--device", "cpu", "--no-progress"
        ).exit_code
        == 0
    )
    assert (
        run_cli(
            "predict",
            "-w",
            work,
            "-i",
            image,
            "-o",
            explicit,
            "-c",
            "3d_fullres",
            "--no-tta",
            "--device",
            "cpu",
            "--no-progress",
        ).exit_code
        == 0
    )

    data, geometry = read_channels([image])
    members = [
        Predictor.from_workdir(work, configuration=c, folds=[0], device="cpu", tta=False) for c in ("3d_fullres", "2d")
    ]
    plan = members[0].plan
    on_grid = [
        probabilities_on_input_grid(
            *m.members[0].probabilities(np.array(data), geometry), plan, m.members[0].config.resampling
        )
        for m in members
    ]
    average = (on_grid[0].astype(np.float32) + on_grid[1]) / 2
    expected = apply_steps(paint_labels(average, geometry.shape, plan.regions), steps, geometry.spacing)
    np.testing.assert_array_equal(read_label(followed / "BRATS_004.nii.gz")[0], to_output_values(expected, plan))
    every_fold = Predictor.from_workdir(work, configuration="3d_fullres", device="cpu", tta=False)  # -c alone: all
    np.testing.assert_array_equal(
        read_label(explicit / "BRATS_004.nii.gz")[0], every_fold.predict_array(data, geometry)
    )


@pytest.mark.slow
def test_select_checks_bf16_on_the_chosen_folds_and_predict_auto_follows_it(trained_two_configs, monkeypatch):
    import torch

    from autoseg.inference import choice
    from autoseg.inference.choice import load_predictor
    from autoseg.inference.predictor import Predictor
    from autoseg.selection import precision

    work, _ = trained_two_configs
    workspace = find_dataset(work)
    document = select_model(workdir=work, configurations=["3d_fullres"], show_progress=False)
    check = document["bf16"]
    assert check["tiles"] == 2 and 0.5 < check["agreement"] <= 1  # one tile per chosen fold
    assert document["openvino"]["tiles"] == 2 or "reason" in document["openvino"]
    assert check["accepted"] == (check["agreement"] >= precision.BF16_AGREEMENT)
    monkeypatch.setattr(precision, "BF16_AGREEMENT", 1.01)  # a model whose bf16 changes classes
    assert select_model(workdir=work, configurations=["3d_fullres"], show_progress=False)["bf16"]["accepted"] is False

    def member(native: bool, accepted: bool, **options):
        monkeypatch.setattr(choice, "cpu_has_native_bf16", lambda: native)
        checks = {"bf16": {"accepted": accepted}, "openvino": {"accepted": False}}  # torch, unless asked
        write_json(workspace.inference, read_json(workspace.inference) | checks)
        return load_predictor(work, device="cpu", **options).members[0]

    def autocast(native: bool, accepted: bool, **options) -> torch.dtype | None:
        return member(native, accepted, **options).window.autocast_dtype

    assert autocast(True, True) == torch.bfloat16
    assert autocast(True, True, precision="fp32") is None  # asked for explicitly
    assert autocast(True, True, folds=[0]) == torch.bfloat16  # a fold select checked: its acceptance holds (issue 23)
    assert autocast(False, True) is None and autocast(True, False) is None
    # OpenVINO compiles the model in bf16 by the same rule (the window itself stays fp32); onnxruntime has no bf16
    openvino = member(True, True, backend="openvino", tta=False)
    assert openvino.bf16 and openvino.window.autocast_dtype is None
    assert Predictor([openvino]).settings()["precision"] == "bf16"  # what report.json records
    assert not member(True, False, backend="openvino", tta=False).bf16
    assert not member(True, True, backend="onnxruntime", tta=False).bf16


def test_without_the_weights_select_refuses_bf16_and_says_why(brain):
    plan = load_plan(find_dataset(brain).plans)
    write_cv(brain, "3d_fullres", lambda case, labels: label_probabilities(labels, plan, 0.9))
    check = select_model(workdir=brain, configurations=["3d_fullres"], postprocessing=False, show_progress=False)[
        "bf16"
    ]
    assert check["accepted"] is False and "checkpoint_final.pt" in check["reason"]


def test_select_checks_openvino_against_torch_on_the_chosen_folds(tmp_path, monkeypatch):
    """inference.json's openvino entry: each chosen fold (random weights here) exported to ONNX and compiled by
    OpenVINO as predict does, its classes on a validation tile compared with torch fp32's; without openvino the
    check is refused with the reason, and predict's default stays torch."""
    import sys

    import torch

    from autoseg.core.checkpoint import save_checkpoint
    from autoseg.inference.onnx_export import importable
    from autoseg.model.network import build_network
    from autoseg.selection import precision

    dataset = synthetic.write_msd_brain(tmp_path / "Task01_BrainTumour", 4, shape=SHAPE)
    ids = [f"BRATS_{i:03d}" for i in range(1, 5)]
    write_json(dataset / "splits_final.json", [{"train": ids[:2], "val": ids[2:]}, {"train": ids[2:], "val": ids[:2]}])
    work = tmp_path / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    workspace, plan = find_dataset(work), load_plan(find_dataset(work).plans)
    write_cv(work, "3d_fullres", lambda case, labels: label_probabilities(labels, plan, 0.9))
    for fold in (0, 1):
        torch.manual_seed(fold)
        network = build_network(plan.configuration("3d_fullres"), 4, plan.num_classes, deep_supervision=False)
        save_checkpoint(workspace.checkpoint("3d_fullres", fold), {"weights": network.state_dict(), "epoch": 1})

    def select() -> dict:
        return select_model(workdir=work, postprocessing=False, show_progress=False)["openvino"]

    if importable("openvino") and importable("onnxscript"):
        check = select()
        assert check["tiles"] == 2 and check["threshold"] == precision.OPENVINO_AGREEMENT == 0.999
        assert check["agreement"] > 0.99 and check["accepted"] == (check["agreement"] >= 0.999)
        assert read_instructions(workspace.inference).openvino_accepted is check["accepted"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    check = select()
    assert check["accepted"] is False and "pip install autoseg[openvino]" in check["reason"]
    assert read_instructions(workspace.inference).openvino_accepted is False


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from autoseg.core.devices import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512bw\n")
    assert not cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_tune_and_select_score_the_same_classes():
    """A region task is scored on its regions alone by both tune's objective and select's summary."""
    import dataclasses

    from autoseg.core.plan import Region
    from autoseg.selection.scoring import summarize
    from autoseg.tuning.objective import mean_dice

    labels_plan = load_plan(Path(__file__).resolve().parents[1] / "plans" / "Task01_BrainTumour" / "plans.json")
    region_plan = dataclasses.replace(
        labels_plan, regions=[Region("WT", [1, 2, 3], 1), Region("TC", [2, 3], 2), Region("ET", [3], 3)]
    )
    per_class = {"edema": 0.2, "non-enhancing tumor": 0.4, "enhancing tumour": 0.6, "WT": 0.9, "TC": 0.8, "ET": 0.7}
    for plan in (labels_plan, region_plan):
        assert mean_dice({"mean": per_class}, plan) == pytest.approx(summarize([per_class], plan).mean)
    assert mean_dice({"mean": per_class}, region_plan) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert mean_dice({"mean": per_class}, labels_plan) == pytest.approx((0.2 + 0.4 + 0.6) / 3)


def test_select_fits_a_temperature_that_calibrates_an_overconfident_model(brain):
    """Wrong at every boundary yet 0.99 sure: select's temperature must soften it and lower ECE on held-out halves."""
    plan = load_plan(find_dataset(brain).plans)
    write_cv(brain, "3d_fullres", lambda case, truth: label_probabilities(shifted(truth), plan, confidence=0.99))
    document = select_model(workdir=brain, configurations=["3d_fullres"], show_progress=False)
    calibration = read_json(find_dataset(brain).inference)["calibration"]
    assert calibration == document["calibration"]
    assert calibration["temperature"] > 1.2
    assert calibration["ece"]["after"] < 0.5 * calibration["ece"]["before"]
    assert calibration["brier"]["after"] < calibration["brier"]["before"]
    assert calibration["voxels"] > 1000
    assert read_instructions(find_dataset(brain).inference).temperature == calibration["temperature"]


def test_select_reports_how_well_the_estimated_dice_predicts_the_real_one(brain):
    """Cases predicted worse and less surely: the estimated Dice must rank them as the real Dice does."""
    plan = load_plan(find_dataset(brain).plans)
    quality = {case: k for k, case in enumerate(sorted(truths(brain)))}  # 0 (best) .. 4 (worst)

    def predict(case: str, truth: np.ndarray) -> np.ndarray:
        k = quality[case]
        return label_probabilities(np.roll(truth, k, axis=1), plan, confidence=0.95 - 0.1 * k)

    write_cv(brain, "3d_fullres", predict)
    document = select_model(workdir=brain, configurations=["3d_fullres"], postprocessing=False, show_progress=False)
    estimate = document["estimated_dice"]
    assert set(estimate) == {"edema", "non-enhancing tumour", "enhancing tumour"}
    assert all(e["cases"] == 5 and 0 <= e["mean_absolute_error"] <= 1 for e in estimate.values())
    assert estimate["edema"]["spearman"] > 0.8
