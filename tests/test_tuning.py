"""`autoseg tune`: plan variants, the search space, loss variants, and tiny real studies on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.errors import PlanError
from autoseg.core.plan import Training, load_plan, plan_from_json, save_plan, to_json
from autoseg.model.losses import SegmentationLoss
from autoseg.phantoms import synthetic
from autoseg.planning.planner import activation_budget
from autoseg.tuning.space import build_variant, load_space

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "plans" / "Task01_BrainTumour" / "plans.json"
#: a space whose trials are quick on CPU and differ only where the test needs them to
TINY_SPACE = {
    "version": 1,
    "dimensions": {
        "learning_rate": {"choices": [3e-2, 1e-6]},
        "batch_size": {"choices": [1]},
        "width": {"choices": [0.5]},
        "depth": {"choices": [0]},
        "augmentation_strength": {"choices": [0.0]},
        "loss": {"choices": ["dice_ce"]},
        "foreground_fraction": {"choices": [0.5]},
    },
}


# --------------------------------------------------------------------------- plan variants (fast)


def test_variant_is_saved_minimal_and_loads_resolved(tmp_path):
    plan = load_plan(REFERENCE)
    base = plan.configurations["3d_fullres"]
    tuned = dataclasses.replace(
        base,
        name="3d_fullres_tuned",
        inherits_from="3d_fullres",
        batch_size=3,
        training=Training(initial_lr=3e-3, loss="dice_topk"),
    )
    plan = dataclasses.replace(plan, configurations={**plan.configurations, tuned.name: tuned})
    stored = to_json(plan)["configurations"]
    assert stored["3d_fullres_tuned"] == {
        "inherits_from": "3d_fullres",
        "batch_size": 3,
        "training": {"initial_lr": 3e-3, "loss": "dice_topk"},
    }
    assert "training" not in stored["3d_fullres"]  # default recipe: planned entries stay as before
    save_plan(tmp_path / "plans.json", plan)
    assert load_plan(tmp_path / "plans.json") == plan


def test_variant_chain_cycle_missing_base_and_unknown_key(tmp_path):
    data = json.loads(REFERENCE.read_text())
    configs = data["configurations"]
    configs["a"] = {"inherits_from": "3d_fullres", "batch_size": 4}
    configs["b"] = {"inherits_from": "a", "training": {"loss": "dice_focal"}}
    plan = plan_from_json(data)
    assert plan.configurations["b"].batch_size == 4 and plan.configurations["b"].training.loss == "dice_focal"
    assert plan.configurations["b"].patch_size == plan.configurations["3d_fullres"].patch_size
    configs["a"]["inherits_from"] = "b"
    with pytest.raises(PlanError, match="cycle"):
        plan_from_json(data)
    configs["a"]["inherits_from"] = "3d_cascade"
    with pytest.raises(PlanError, match="'3d_cascade', which is not in the plan"):
        plan_from_json(data)
    configs["a"] = {"inherits_from": "3d_fullres", "learning_rate": 0.1}
    with pytest.raises(PlanError, match=r"configurations\.a: unknown key\(s\) \['learning_rate'\]"):
        plan_from_json(data)
    configs["a"] = {"inherits_from": "3d_fullres", "training": {"loss": "dice_hinge"}}
    with pytest.raises(PlanError, match=r"configurations\.a\.training: .*'dice_hinge' is unknown"):
        plan_from_json(data)


# --------------------------------------------------------------------------- search space (fast)


def test_space_file_is_validated(tmp_path):
    path = tmp_path / "space.json"
    for dimensions, message in [
        ({"lr": {"low": 1}}, "unknown dimension 'lr'"),
        ({"learning_rate": {"low": 0.1, "high": 0.01}}, "need low < high"),
        ({"loss": {"choices": ["dice_ce", "l2"]}}, "one of"),
        ({"batch_size": {"low": 1, "high": 4}}, "unknown key"),
        ({"depth": {"choices": [1]}}, "integer <= 0"),
    ]:
        path.write_text(json.dumps({"version": 1, "dimensions": dimensions}))
        with pytest.raises(PlanError, match=message):
            load_space(path)
    path.write_text(json.dumps({"version": 1, "dimensions": {"learning_rate": {"choices": [0.01, 0.02]}}}))
    space = load_space(path, dimensions=["learning_rate", "loss"])
    assert space["learning_rate"] == {"enabled": True, "choices": [0.01, 0.02]}
    assert [n for n, e in space.items() if e["enabled"]] == ["learning_rate", "loss"]
    with pytest.raises(PlanError, match="unknown dimension"):
        load_space(None, dimensions=["widht"])


def test_variants_stay_within_the_plans_memory_budget():
    plan = load_plan(REFERENCE)
    base = plan.configurations["3d_fullres"]
    budget = activation_budget(3, plan.gpu_memory_gb)

    def used(c):  # activation elements of a whole batch, in the planner's units (reference batch 2)
        return c.activation_estimate / 2 * c.batch_size

    bigger_batch = build_variant(plan, base, "v", {"batch_size": 2})
    assert bigger_batch.batch_size == 2 * base.batch_size
    assert bigger_batch.patch_size != base.patch_size and used(bigger_batch) <= budget
    wide = build_variant(plan, base, "v", {"width": 1.5})
    assert wide.network.features_per_stage[0] == 48 and used(wide) <= budget
    assert all(w <= b for w, b in zip(wide.patch_size, base.patch_size))
    narrow = build_variant(plan, base, "v", {"width": 0.5, "depth": -1})
    assert narrow.patch_size == base.patch_size and narrow.network.n_stages == base.network.n_stages - 1
    assert narrow.network.features_per_stage == [f // 2 for f in base.network.features_per_stage[:-1]]
    training_only = build_variant(plan, base, "v", {"learning_rate": 0.003, "loss": "dice_focal"})
    assert training_only.data_identifier == base.data_identifier and training_only.network == base.network
    renormalised = build_variant(plan, base, "v", {"normalization_0": "rescale"})
    assert (
        renormalised.normalization[0].scheme == "rescale" and renormalised.normalization[1:] == base.normalization[1:]
    )
    assert renormalised.data_identifier.startswith("3d_fullres_norm_")  # its own preprocessed data


def test_loss_variants_weigh_voxels_differently():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    ce, focal, topk = (
        float(SegmentationLoss(None, False, None, v)(logits, target)) for v in ("dice_ce", "dice_focal", "dice_topk")
    )
    assert focal < ce < topk  # focal down-weights easy voxels; top-k keeps only the hardest 10 %
    regions = SegmentationLoss([[1, 2], [2]], False, None, "dice_topk")(logits[:, :2], target)
    assert torch.isfinite(regions)


def test_cli_errors_are_one_line(tmp_path, run_cli):
    result = run_cli("tune", "-w", tmp_path, "--report")
    assert result.exit_code == 1 and "no planned dataset" in result.output


# --------------------------------------------------------------------------- real studies (slow)


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    dataset = synthetic.write_msd_brain(root / "raw", 5, shape=(24, 28, 26))
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    (root / "space.json").write_text(json.dumps(TINY_SPACE))
    return work


@pytest.mark.slow
def test_a_bad_fold_fails_before_the_study_exists(tiny_work, run_cli):
    result = run_cli(*_tune_args(tiny_work, "--study", "typo", "--folds", "7", "--n-trials", "1"))
    assert result.exit_code == 1 and "fold 7 does not exist" in result.output
    assert not (tiny_work / "raw" / "tuning" / "typo.db").exists()  # the right folds can use the name later


@pytest.mark.slow
def test_a_full_disk_during_a_trial_is_one_line_without_optunas_traceback(tiny_work, run_cli, capfd, monkeypatch):
    import errno

    def full_disk(**_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "checkpoint_latest.pt")

    monkeypatch.setattr("autoseg.tuning.objective.train_and_validate", full_disk)
    result = run_cli(*_tune_args(tiny_work, "--study", "full", "--n-trials", "1"))
    err = capfd.readouterr().err
    assert result.exit_code == 1 and result.output.strip().endswith("(finished work is kept)"), result.output
    assert "cannot write checkpoint_latest.pt: No space left on device" in result.output
    assert "trial 0 failed: " in result.output and "Traceback" not in result.output + err, err


def _tune_args(work: Path, *extra: str) -> list[str]:
    return [
        "tune",
        "-w",
        str(work),
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--space",
        str(work.parent / "space.json"),
        *extra,
    ]


def _cli_process(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "autoseg.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )


def _study(work: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'raw' / 'tuning' / f'{name}.db'}")


@pytest.mark.slow
def test_study_prunes_writes_the_tuned_configuration_which_trains_and_predicts(tiny_work, run_cli, tmp_path):
    from autoseg.commands.tune import tune_dataset

    # Seed 11 draws the learning rate 3e-2 first, then 1e-6 (learns nothing): the median pruner
    # stops those trials on their first reported pseudo-Dice.
    result = tune_dataset(
        workdir=tiny_work,
        n_trials=3,
        epochs=1,
        iterations=4,
        val_iterations=1,
        space_file=tiny_work.parent / "space.json",
        study_name="pruning",
        workers=0,
        device="cpu",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1),
        seed=11,
        show_progress=False,
    )
    study = _study(tiny_work, "pruning")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1, [(t.params, t.intermediate_values) for t in study.trials]
    assert len(study.trials) == 3 and result.finished == 3
    for pruned in (t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED):
        assert pruned.params["learning_rate"] == 1e-6 and list(pruned.intermediate_values) == [0]
    best = max((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    stored = json.loads((tiny_work / "raw" / "plans.json").read_text())["configurations"]["3d_fullres_tuned"]
    assert stored["inherits_from"] == "3d_fullres"
    assert stored["training"]["initial_lr"] == best.params["learning_rate"]
    assert not (tiny_work / "raw" / "models").exists()  # trials never write under models/
    assert (
        tiny_work / "raw" / "tuning" / "pruning" / f"trial_{best.number}" / "fold_0" / "checkpoint_final.pt"
    ).is_file()

    report = run_cli("tune", "-w", tiny_work, "--study", "pruning", "--report")
    assert report.exit_code == 0, report.output
    assert "PRUNED" in report.output and "learning_rate" in report.output
    assert (tiny_work / "raw" / "tuning" / "pruning_history.png").stat().st_size > 1000

    trained = run_cli(
        "train",
        "-w",
        tiny_work,
        "-c",
        "3d_fullres_tuned",
        "--fold",
        "0",
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tta",
    )
    assert trained.exit_code == 0, trained.output
    log = (tiny_work / "raw" / "models" / "3d_fullres_tuned" / "fold_0" / "log.jsonl").read_text().splitlines()
    assert json.loads(log[0])["settings"]["initial_lr"] == best.params["learning_rate"]
    image = sorted((tiny_work.parent / "raw" / "imagesTr").glob("*.nii.gz"))[0]
    predicted = run_cli(
        "predict",
        "-w",
        tiny_work,
        "-c",
        "3d_fullres_tuned",
        "-i",
        image,
        "-o",
        tmp_path / "pred",
        "--fast",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert predicted.exit_code == 0, predicted.output
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1


@pytest.mark.slow
def test_two_workers_share_one_study(tiny_work):
    workers = [
        _cli_process(_tune_args(tiny_work, "--study", "shared", "--n-trials", "2", "--seed", str(s))) for s in (0, 100)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    study = _study(tiny_work, "shared")
    finished = [t for t in study.trials if t.state.is_finished()]
    # One count over both workers (alone, each would run 2); a trial asked for in the same instant
    # as the last one is skipped as surplus.
    assert len(finished) == 2, [t.state for t in study.trials]
    assert {t.user_attrs["pid"] for t in study.trials} <= {w.pid for w in workers}


@pytest.mark.slow
def test_resume_after_kill_fails_the_killed_trial_and_repeats_no_finished_one(tiny_work):
    args = _tune_args(tiny_work, "--study", "resume", "--n-trials", "2", "--pruner", "none")
    worker = _cli_process(args)
    deadline = time.time() + 240
    trial_1 = tiny_work / "raw" / "tuning" / "resume" / "trial_1"
    while time.time() < deadline and worker.poll() is None and not trial_1.is_dir():
        time.sleep(0.02)  # the folder appears when the second trial starts training: kill it then
    assert worker.poll() is None, "the worker finished before it could be killed"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = _study(tiny_work, "resume")
    before = {t.number: t.state for t in study.trials}
    assert before.get(0) == optuna.trial.TrialState.COMPLETE and before.get(1) == optuna.trial.TrialState.RUNNING, (
        before
    )

    again = _cli_process(args)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    trials = _study(tiny_work, "resume").trials
    assert (
        trials[0].state == optuna.trial.TrialState.COMPLETE
        and trials[0].datetime_complete == study.trials[0].datetime_complete
    )  # the finished trial was not run again
    assert trials[1].state == optuna.trial.TrialState.FAIL
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    assert any(t.system_attrs.get("failed_trial") == 1 for t in trials)  # killed trial retried


def _open_storage_in_child(url: str, queue) -> None:
    from autoseg.tuning.study import open_storage

    try:
        open_storage(url)
        queue.put("ok")
    except Exception as exc:  # report, do not hide: the parent asserts on it
        queue.put(f"{type(exc).__name__}: {exc}")


def test_workers_opening_a_new_sqlite_study_at_once_do_not_collide(tmp_path):
    """Without the schema lock, two of four processes typically fail with 'table ... already exists'."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f's{round_}.db'}"
        queue = context.Queue()
        workers = [context.Process(target=_open_storage_in_child, args=(url, queue)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        results = [queue.get(timeout=5) for _ in workers]
        assert results == ["ok"] * 4, results


def test_a_trial_started_past_n_trials_is_surplus_and_skipped():
    """Two workers asking at the same instant: the later-numbered trial must not run."""
    from autoseg.tuning.study import ENDED_ATTR, is_surplus

    study = optuna.create_study(direction="maximize")
    first, second, third = study.ask(), study.ask(), study.ask()
    assert not is_surplus(study, first.number, 2) and not is_surplus(study, second.number, 2)
    assert is_surplus(study, third.number, 2)
    first.set_user_attr(ENDED_ATTR, True)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # a trial that failed (not died) frees its place
    assert not is_surplus(study, third.number, 2)


def test_a_dead_trial_keeps_its_place_until_its_retry_is_queued_and_run():
    """Failing a dead trial and queueing its retry are two steps; a worker looking in between
    must not start a fresh trial (the retry would be left WAITING when the study ends)."""
    from autoseg.tuning.study import ENDED_ATTR, StopAt, counted, is_surplus, queued, retry_callback

    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        done = study.ask()
        done.set_user_attr(ENDED_ATTR, True)
        study.tell(done, 0.5)
    dead, elsewhere = study.ask(), study.ask()
    dead.suggest_float("lr", 1e-4, 1e-1)
    study.tell(dead, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials does: no ENDED_ATTR
    assert counted(study) == 4 and not queued(study)  # between the two steps: the retry is counted
    racing = study.ask()  # a worker that started anyway finds itself surplus
    assert is_surplus(study, racing.number, 4)
    racing.set_user_attr(ENDED_ATTR, True)
    study.tell(racing, state=optuna.trial.TrialState.FAIL)

    retry_callback()(study, study.trials[dead.number])
    assert counted(study) == 4 and queued(study)
    StopAt(4)(study, study.trials[-1])
    assert not study._stop_flag  # a queued retry keeps the workers going
    retry = study.ask()  # optimize pops the WAITING retry first
    assert retry.params == study.trials[dead.number].params != {} and not is_surplus(study, retry.number, 4)
    retry.set_user_attr(ENDED_ATTR, True)
    study.tell(retry, state=optuna.trial.TrialState.FAIL)  # the retry failed for real: its place is free
    study.tell(elsewhere, 0.5)
    assert counted(study) == 3 and not queued(study)


@pytest.mark.slow
def test_surplus_trial_ends_before_training_and_stops_the_worker(tiny_work):
    from autoseg.core.workspace import find_dataset
    from autoseg.tuning.objective import TrialBudget, make_objective
    from autoseg.tuning.space import load_space
    from autoseg.tuning.study import StopAt, SurplusTrial, trials_table

    workspace = find_dataset(tiny_work, None)
    study = optuna.create_study(direction="maximize")
    study.ask(), study.ask()  # another worker is running the study's two trials
    trials_dir = tiny_work.parent / "surplus_trials"
    objective = make_objective(
        workspace,
        load_plan(workspace.plans),
        "3d_fullres",
        ["0"],
        load_space(tiny_work.parent / "space.json", None),
        TrialBudget(1, 2, 1, "cpu", 0),
        trials_dir,
        2,
        show_progress=False,
    )
    study.optimize(objective, n_trials=5, callbacks=[StopAt(2)], catch=(SurplusTrial,))
    skipped = study.trials[-1]
    assert len(study.trials) == 3 and skipped.state == optuna.trial.TrialState.FAIL
    assert skipped.user_attrs["surplus"] and not trials_dir.exists()  # stopped at once, nothing trained
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(trials_table(study))
    assert "SKIPPED" in console.export_text()
