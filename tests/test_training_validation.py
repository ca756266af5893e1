"""Real validation during training (`--val-every`) and early stopping (`--early-stop`).

The stopping rule and the default interval are tested on numbers; the trainer with a validation
whose Dice sequence the test constructs (so which epoch is best, and when training must stop, is
known in advance); and one short end-to-end run with the real predictor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from training_hooks import Killed, kill_after

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import load_checkpoint
from autoseg.phantoms import synthetic
from autoseg.training.real_validation import (
    DEFAULT_EARLY_STOP_DELTA,
    RealDiceState,
    cooldown_epochs,
    default_val_every,
    mean_real_dice,
)
from autoseg.training.settings import TrainingSettings, poly_lr
from autoseg.training.trainer import train_fold
from autoseg.workflows.validation import MAX_TRAINING_VALIDATION_CASES, training_subset, window_tiles

TINY = dict(iterations=1, val_iterations=1, workers=0, device="cpu", show_progress=False)


def stop_index(scores: list[float], patience: int, delta: float = 0.0) -> int | None:
    """The validation (0-based) at which the rule stops, None if it never does."""
    state = RealDiceState()
    for index, score in enumerate(scores):
        state.update(score, index, delta)
        if state.exhausted(patience):
            return index
    return None


def test_stopping_rule_counts_validations_without_a_strictly_better_dice():
    assert stop_index([0.2, 0.5, 0.4, 0.45, 0.3], patience=3) == 4
    assert stop_index([0.2, 0.5, 0.4, 0.6, 0.3, 0.55], patience=3) is None  # 0.6 restarted the count
    assert stop_index([0.5, 0.5, 0.5], patience=2) == 2  # equal is not better
    assert stop_index([0.1, 0.2, 0.3, 0.4], patience=1) is None
    assert stop_index([0.0, 0.0], patience=1) == 1  # a first Dice of 0 is still the first best
    assert stop_index([0.9, 0.1, 0.1, 0.1], patience=0) is None  # patience 0: never stop


def test_a_new_best_by_less_than_the_delta_does_not_restart_the_count():
    creep = [0.80, 0.802, 0.803, 0.8035, 0.804, 0.70]  # the real Dice creeping up on a plateau
    assert stop_index(creep, patience=3, delta=0.0) is None  # every tiny new best restarts the count
    assert stop_index(creep, patience=3, delta=0.005) == 3  # three validations within 0.005 of 0.80
    jump = [0.80, 0.802, 0.806, 0.807, 0.808, 0.809]
    assert stop_index(jump, patience=3, delta=0.005) == 5  # 0.806 beat 0.80 by more than 0.005: counted from it
    assert stop_index([0.5, 0.75], patience=1, delta=0.25) == 1  # beating by exactly the delta is not enough
    state = RealDiceState()
    assert [state.update(score, epoch, 0.005) for epoch, score in enumerate(creep)] == [True] + [False] * 5
    assert (state.best, state.best_epoch) == (0.80, 0)  # the best (and checkpoint_best.pt) follow the same rule


def test_stopping_state_round_trips_through_json():
    state = RealDiceState()
    for epoch, score in enumerate([0.3, 0.7, 0.6]):
        state.update(score, epoch)
    again = RealDiceState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state and (again.best, again.best_epoch, again.since_best) == (0.7, 1, 1)
    assert RealDiceState.from_json(None) == RealDiceState()  # a checkpoint from before validation existed
    state.stop(5, 3)
    assert RealDiceState.from_json(json.loads(json.dumps(state.to_json()))).cooldown_end == 8
    # a run stopped before the cool-down existed ended at its stop: resuming it trains nothing
    old = {"best": 0.7, "best_epoch": 1, "since_best": 3, "stopped_epoch": 4}
    assert RealDiceState.from_json(old).cooldown_end == 4 and RealDiceState.from_json(old).finished(4)


def test_cooldown_is_half_the_epochs_trained_within_the_budget():
    assert cooldown_epochs(23, 100, None) == 12  # 24 epochs trained: 12 more, 36 in all
    assert cooldown_epochs(0, 100, None) == 1  # rounded up: a stop always cools down while budget is left
    assert cooldown_epochs(79, 100, None) == 20  # 40 wanted, 20 left in the budget
    assert cooldown_epochs(99, 100, None) == 0  # stopped at the last epoch: nothing left
    assert cooldown_epochs(23, 100, 7) == 7 and cooldown_epochs(95, 100, 7) == 4  # asked for, within the budget
    assert cooldown_epochs(23, 100, 0) == 0  # 0: end at the stop
    for stop in range(100):  # never past the budget
        assert stop + cooldown_epochs(stop, 100, None) <= 99


def test_cooldown_lr_decays_from_the_stop_rate_to_zero_over_the_cooldown():
    settings = TrainingSettings(dataset="d", configuration="c", fold="0", epochs=100)
    at_stop = poly_lr(settings, 23)
    assert poly_lr(settings, 23, 23, 35) == at_stop == pytest.approx(0.01 * (1 - 23 / 100) ** 0.9)
    rates = [poly_lr(settings, epoch, 23, 35) for epoch in range(24, 36)]
    # the poly curve laid over the 13 epochs 23..35: the last at 1/13 of the stop's rate to the 0.9
    assert rates == pytest.approx([at_stop * (1 - k / 13) ** 0.9 for k in range(1, 13)])
    assert all(a > b for a, b in zip([at_stop] + rates, rates)) and rates[-1] < 0.1 * at_stop
    assert [poly_lr(settings, e, 23, 35) for e in range(24)] == [poly_lr(settings, e) for e in range(24)]


def test_default_interval_keeps_validation_near_a_tenth_of_training():
    batch, iterations, val_iterations = 2, 250, 50
    epoch_passes = batch * (3 * iterations + val_iterations)
    for passes in (1, 100, 160, 161, 5000, 123457):
        every = default_val_every(passes, batch, iterations, val_iterations)
        assert passes / (every * epoch_passes) <= 0.1  # at most a tenth ...
        assert every == 1 or passes / ((every - 1) * epoch_passes) > 0.1  # ... and no more often needed


def test_mean_real_dice_uses_the_scored_classes_only():
    dice = {"edema": 0.8, "enhancing": 0.6, "whole tumor": 0.9, "tumor core": float("nan")}
    assert mean_real_dice(dice, ["edema", "enhancing"]) == pytest.approx(0.7)
    assert mean_real_dice(dice, ["whole tumor", "tumor core"]) == pytest.approx(0.9)
    assert mean_real_dice({}, ["edema"]) == 0.0


def test_window_tiles_count_the_sliding_window():
    assert window_tiles((40, 48, 40), (40, 48, 40), 0.5) == 1
    assert window_tiles((20, 20, 20), (40, 48, 40), 0.5) == 1  # padded to the patch
    assert window_tiles((100, 48, 40), (40, 48, 40), 0.5) == math.ceil(60 / 20) + 1
    assert window_tiles((7, 100, 64), (64, 64), 0.5) == 7 * 3  # a 2D patch over every slice


def test_large_folds_validate_a_fixed_seeded_subset():
    few = [f"case_{i}" for i in range(10)]
    assert training_subset(few) == sorted(few)
    many = [f"case_{i:03d}" for i in range(200)]
    subset = training_subset(many)
    assert len(subset) == MAX_TRAINING_VALIDATION_CASES and set(subset) <= set(many)
    assert training_subset(list(reversed(many))) == subset  # the same cases whatever the order given


class ScriptedValidation:
    """A validation whose real Dice follows a script, one value per call."""

    forward_passes = 1

    def __init__(self, scores: list[float]) -> None:
        self.scores = list(scores)
        self.calls = 0

    def __call__(self, weights: dict) -> dict[str, float]:
        assert weights and all(hasattr(t, "shape") for t in weights.values())
        score = self.scores[self.calls]
        self.calls += 1
        return {"edema": score, "non-enhancing tumour": score, "enhancing tumour": score}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valstop")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", 5, shape=(24, 28, 26))
    plan_dataset(dataset_dir=dataset, workdir=root / "work", configurations=["3d_fullres"], show_progress=False)
    return root / "work"


def entries(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def epochs_of(folder: Path) -> list[dict]:
    return [e for e in entries(folder) if "epoch" in e and "event" not in e]


@pytest.mark.slow
def test_val_every_logs_real_dice_and_the_best_checkpoint_follows_it(work):
    validation = ScriptedValidation([0.8, 0.3])
    result = train_fold(workdir=work, fold="0", epochs=4, resume=False, validate=validation, val_every=2, **TINY)
    log = epochs_of(result.folder)
    assert [e["epoch"] for e in log if "real_dice" in e] == [1, 3]
    assert [e["real_dice_mean"] for e in log if "real_dice" in e] == pytest.approx([0.8, 0.3])
    assert set(log[1]["real_dice"]) == {"edema", "non-enhancing tumour", "enhancing tumour"}
    assert load_checkpoint(result.folder / "checkpoint_best.pt")["epoch"] == 1  # not the pseudo-Dice's pick
    final = load_checkpoint(result.folder / "checkpoint_final.pt")
    assert final["epoch"] == 3 and final["real_dice"]["best_epoch"] == 1 and final["real_dice"]["stopped_epoch"] is None
    assert result.stopped_epoch is None and final["settings"]["val_every"] == 2


@pytest.mark.slow
def test_early_stop_cools_down_then_ends_and_says_so(work):
    # stops after epoch 3 (two validations not above 0.6); 4 epochs trained, so 2 of cool-down: ends after epoch 5
    validation = ScriptedValidation([0.4, 0.6, 0.5, 0.55, 0.9, 0.7, 0.1])
    result = train_fold(
        workdir=work, fold="1", epochs=10, resume=False, validate=validation, val_every=1, early_stop=2, **TINY
    )
    assert (result.stopped_epoch, result.cooldown_end) == (3, 5) and validation.calls == 6
    log = epochs_of(result.folder)
    assert [e["epoch"] for e in log] == [0, 1, 2, 3, 4, 5]
    at_stop = 0.01 * (1 - 3 / 10) ** 0.9  # the 10-epoch schedule up to the stop, then down to 0 over 3 epochs
    assert [e["lr"] for e in log[3:]] == pytest.approx([at_stop, at_stop * (2 / 3) ** 0.9, at_stop * (1 / 3) ** 0.9])
    assert all("real_dice" in e for e in log)  # validation goes on during the cool-down
    stop, cooled = (
        next(e for e in entries(result.folder) if e.get("event") == name) for name in ("early_stop", "cooldown_end")
    )
    assert stop == {
        "event": "early_stop",
        "epoch": 3,
        "best_epoch": 1,
        "best_real_dice": pytest.approx(0.6),
        "patience": 2,
        "delta": DEFAULT_EARLY_STOP_DELTA,
        "cooldown_epochs": 2,
        "cooldown_end": 5,
        "iterations": 4,
        "budget_iterations": 10,
    }
    assert cooled == {
        "event": "cooldown_end",
        "epoch": 5,
        "stopped_epoch": 3,
        "best_epoch": 4,
        "best_real_dice": pytest.approx(0.9),
        "iterations": 6,
        "budget_iterations": 10,
    }
    final = load_checkpoint(result.folder / "checkpoint_final.pt")
    assert final["epoch"] == 5 and (final["real_dice"]["stopped_epoch"], final["real_dice"]["cooldown_end"]) == (3, 5)
    assert load_checkpoint(result.folder / "checkpoint_best.pt")["epoch"] == 4  # the cool-down's 0.9 beat 0.6

    again = train_fold(workdir=work, fold="1", validate=ScriptedValidation([]), val_every=1, **TINY)
    assert again.stopped_epoch == 3 and len(epochs_of(result.folder)) == 6  # a stopped run stays stopped


@pytest.mark.slow
def test_a_run_killed_in_its_cooldown_resumes_to_the_same_end(work, tmp_path):
    scores = [0.5, 0.4, 0.4, 0.45, 0.3, 0.2]  # stop after epoch 2 (patience 2): 3 epochs trained, cool-down 2
    run = dict(workdir=work, fold="0", output_folder=tmp_path, epochs=6, val_every=1, early_stop=2, **TINY)
    whole = train_fold(resume=False, validate=ScriptedValidation(scores), **run)
    assert (whole.stopped_epoch, whole.cooldown_end) == (2, 4)
    uninterrupted = [(e["epoch"], e["lr"], "real_dice" in e) for e in epochs_of(whole.folder)]
    with pytest.raises(Killed):  # killed after epoch 3, the first of the cool-down
        train_fold(resume=False, validate=ScriptedValidation(scores), on_epoch_end=kill_after(3), **run)
    state = load_checkpoint(whole.folder / "checkpoint_latest.pt")["real_dice"]
    assert (state["stopped_epoch"], state["cooldown_end"]) == (2, 4)
    resumed = ScriptedValidation(scores[4:])
    result = train_fold(workdir=work, fold="0", output_folder=tmp_path, validate=resumed, **TINY)  # all resumed
    assert (result.stopped_epoch, result.cooldown_end) == (2, 4) and resumed.calls == 1
    assert [(e["epoch"], e["lr"], "real_dice" in e) for e in epochs_of(whole.folder)] == uninterrupted
    assert [e["event"] for e in entries(whole.folder) if e.get("event") in ("early_stop", "cooldown_end")] == [
        "early_stop",
        "cooldown_end",
    ]
    assert load_checkpoint(whole.folder / "checkpoint_final.pt")["epoch"] == 4


@pytest.mark.slow
def test_resume_keeps_the_early_stopping_state(work):
    folder = work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_2"
    with pytest.raises(Killed):  # killed after epoch 1 was checkpointed: best 0.6 at epoch 0, one miss since
        train_fold(
            workdir=work,
            fold="2",
            epochs=10,
            resume=False,
            validate=ScriptedValidation([0.6, 0.5, 0.7]),
            val_every=1,
            early_stop=3,
            early_stop_delta=0.05,
            on_epoch_end=kill_after(1),
            **TINY,
        )
    latest = load_checkpoint(folder / "checkpoint_latest.pt")
    state = latest["real_dice"]
    assert (state["best"], state["best_epoch"], state["since_best"]) == (pytest.approx(0.6), 0, 1)
    assert (latest["settings"]["early_stop"], latest["settings"]["early_stop_delta"]) == (3, 0.05)
    # The resumed run remembers the miss, its patience and its delta: 0.63 and 0.64 are not better than
    # 0.6 by more than 0.05, so two more misses stop it, not three.
    resumed = ScriptedValidation([0.63, 0.64, 0.99, 0.5])
    result = train_fold(workdir=work, fold="2", validate=resumed, **TINY)
    assert (result.stopped_epoch, result.cooldown_end) == (3, 5) and resumed.calls == 4
    assert [e["epoch"] for e in epochs_of(folder)] == [0, 1, 2, 3, 4, 5]


def test_early_stop_delta_without_early_stop_is_refused_in_one_line(work, run_cli):
    result = run_cli(
        "train", "-w", work, "--fold", "3", "--early-stop-delta", "0.01", "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --early-stop-delta 0.01 needs early stopping, and this run has none; "
        "add --early-stop PATIENCE or drop --early-stop-delta"
    ]
    assert not (work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_3").exists()


def test_early_stop_cooldown_without_early_stop_is_refused_in_one_line(work, run_cli):
    result = run_cli(
        "train", "-w", work, "--fold", "3", "--early-stop-cooldown", "4", "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --early-stop-cooldown 4 needs early stopping, and this run has none; "
        "add --early-stop PATIENCE or drop --early-stop-cooldown"
    ]
    assert not (work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_3").exists()


def test_early_stop_without_validation_is_refused_in_one_line(work, run_cli):
    result = run_cli(
        "train", "-w", work, "--fold", "3", "--early-stop", "3", "--val-every", "0", "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --early-stop 3 needs real validation during training, and this run has none (--val-every 0); "
        "drop --early-stop or validate with --val-every N"
    ]
    assert not (work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_3").exists()


@pytest.mark.slow
def test_real_validation_end_to_end(work, run_cli):
    """The real predictor: Dice per label in log.jsonl, the stop in the log and on the command line."""
    result = run_cli(
        "train",
        "-w",
        work,
        "--fold",
        "4",
        "--epochs",
        "12",
        "--iterations",
        "1",
        "--val-iterations",
        "1",
        "--val-every",
        "1",
        "--early-stop",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-validate",
        "--no-progress",
        "--no-resume",
    )
    assert result.exit_code == 0, result.output
    folder = work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_4"
    log = epochs_of(folder)
    assert all(set(e["real_dice"]) == {"edema", "non-enhancing tumour", "enhancing tumour"} for e in log)
    assert all(0 <= v <= 1 for e in log for v in e["real_dice"].values())
    stop = next(e for e in entries(folder) if e.get("event") == "early_stop")
    assert stop["epoch"] < 11 and log[-1]["epoch"] == stop["cooldown_end"] == stop["epoch"] + cooldown_epochs(
        stop["epoch"], 12, None
    )
    at_stop = log[stop["epoch"]]["real_dice_mean"]
    assert at_stop <= max(e["real_dice_mean"] for e in log[: stop["epoch"]]) + DEFAULT_EARLY_STOP_DELTA
    assert f"stopped early after epoch {stop['epoch'] + 1} of 12" in result.output
    assert (folder / "progress.png").stat().st_size > 1000
