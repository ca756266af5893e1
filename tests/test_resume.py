"""A killed `train` resumes to the end the whole run would have reached: the final-checkpoint window,
a torn last line of log.jsonl, and every random stream (CUDA's too) in the resume state."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from training_hooks import Killed, kill_after

from autoseg.commands.plan import plan_dataset
from autoseg.core import checkpoint
from autoseg.core.checkpoint import load_checkpoint, restore_rng_state, rng_state
from autoseg.core.workspace import find_dataset
from autoseg.phantoms import synthetic
from autoseg.training.trainer import train_fold
from autoseg.workflows.fold import train_and_validate

TINY = dict(iterations=1, val_iterations=1, workers=0, device="cpu", show_progress=False, val_every=0)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", 5, shape=(24, 28, 26))
    plan_dataset(dataset_dir=dataset, workdir=root / "work", configurations=["3d_fullres"], show_progress=False)
    return root / "work"


def epochs_of(folder: Path) -> list[int]:
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return [e["epoch"] for e in entries if "epoch" in e and "event" not in e]


def test_a_run_killed_before_its_final_checkpoint_finishes_on_rerun(work):
    """Killed after the last epoch's checkpoint_latest.pt and before checkpoint_final.pt: the same command
    again writes the final checkpoint and validates, so predict, select and export find the fold."""
    first = train_and_validate(workdir=work, fold="0", epochs=2, tta=False, **TINY)
    folder = first.training.folder
    (folder / "checkpoint_final.pt").unlink()  # what a kill inside the window leaves
    (folder / "validation" / "summary.json").unlink()
    assert "0" not in find_dataset(work).trained_folds("3d_fullres")
    again = train_and_validate(workdir=work, fold="0", tta=False, **TINY)
    assert (folder / "checkpoint_final.pt").is_file()
    assert load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == 1
    assert again.validation is not None and (folder / "validation" / "summary.json").is_file()
    assert "0" in find_dataset(work).trained_folds("3d_fullres")
    assert epochs_of(folder) == [0, 1]


def test_a_torn_last_log_line_is_dropped_with_a_warning(work, caplog):
    with pytest.raises(Killed):
        train_fold(workdir=work, fold="1", epochs=2, resume=False, on_epoch_end=kill_after(0), **TINY)
    folder = work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_1"
    with open(folder / "log.jsonl", "a") as log:
        log.write('{"epoch": 1, "train_lo')  # the kill fell in the middle of a write
    with caplog.at_level(logging.WARNING):
        train_fold(workdir=work, fold="1", **TINY)
    assert "last line was torn by a kill" in caplog.text
    assert epochs_of(folder) == [0, 1]
    assert load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == 1


def test_the_resume_state_holds_every_random_stream():
    state = rng_state()
    assert set(state) == {"torch", "numpy", "python", "cuda"}
    assert isinstance(state["cuda"], list)  # one state per visible GPU; none on this machine without CUDA
    if not torch.cuda.is_available():
        assert state["cuda"] == []


def test_the_cuda_generators_are_saved_and_restored(monkeypatch):
    """On CPU, a stand-in for two GPUs: their states go into the resume state and come back from it."""
    saved = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(checkpoint.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(checkpoint.torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(checkpoint.torch.cuda, "set_rng_state_all", restored.extend)
    state = rng_state()
    assert [t.tolist() for t in state["cuda"]] == [t.tolist() for t in saved]
    restore_rng_state(state)
    assert [t.tolist() for t in restored] == [t.tolist() for t in saved]
    restored.clear()
    restore_rng_state({**state, "cuda": saved[:1]})  # a checkpoint from one GPU resumed on two
    assert [t.tolist() for t in restored] == [saved[0].tolist()]
    old = {k: v for k, v in state.items() if k != "cuda"}  # a checkpoint from before the CUDA state was saved
    restored.clear()
    restore_rng_state(old)
    assert restored == []


def test_fold_all_does_not_validate_during_training_by_default(work, caplog):
    """fold all's validation cases are its training cases: no real Dice may steer checkpoint_best.pt."""
    tiny = {k: v for k, v in TINY.items() if k != "val_every"}
    with caplog.at_level(logging.INFO):
        train_and_validate(workdir=work, fold="all", epochs=2, validate=False, **tiny)
    folder = work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_all"
    entries = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    assert not any("real_dice" in e for e in entries)
    assert entries[0]["settings"]["val_every"] == 0
    assert "fold all: no validation during training" in caplog.text


def test_no_final_validation_says_that_validation_during_training_still_runs(work, caplog):
    with caplog.at_level(logging.INFO):
        train_and_validate(workdir=work, fold="2", epochs=1, validate=False, resume=False, **{**TINY, "val_every": 1})
    assert "turns off only the final pass" in caplog.text
