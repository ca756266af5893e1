"""Doubtful inputs that must be refused by name or reported, never used silently (issue 11, items 7 and 8).

Checkpoints that are not plain data, fold names that are not folds, datasets too small for
cross-validation, label maps and channels that hold nothing to learn, and case files that live
outside the dataset folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import load_checkpoint, save_checkpoint
from autoseg.core.errors import CheckpointError
from autoseg.phantoms import synthetic

SHAPE = (16, 20, 18)


# --------------------------------------------------------------------------- checkpoints


def test_a_pickled_checkpoint_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    path = tmp_path / "checkpoint_final.pt"
    torch.save({"version": 1, "weights": {}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "not a plain-weights checkpoint" in message and "not loaded" in message, message
    assert "argparse.Namespace" in message, message
    assert "weights_only" not in message and "trust" not in message, message
    assert caught.value.__cause__ is None  # torch's advice does not come back in a --verbose traceback either


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not a checkpoint at all", "is not a plain-weights checkpoint, so it was not loaded"),
        ("truncated", "damaged or not a PyTorch checkpoint"),
        ("tensor", "not an autoseg checkpoint"),
    ],
)
def test_damaged_or_foreign_checkpoints_are_refused_by_name(tmp_path, content, expected):
    path = tmp_path / "checkpoint_latest.pt"
    if content == "truncated":
        save_checkpoint(path, {"weights": {"w": torch.zeros(1000)}})
        path.write_bytes(path.read_bytes()[:300])
    elif content == "tensor":
        torch.save(torch.zeros(3), path)  # loads with weights_only, but is no dict
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert expected in str(caught.value) and str(path) in str(caught.value)
    assert "weights_only" not in str(caught.value)


# --------------------------------------------------------------------------- fold names


@pytest.mark.parametrize(
    "command",
    [
        ["predict", "-i", "{tmp}", "-o", "{tmp}/out"],
        ["export", "-o", "{tmp}/model.zip"],
        ["tune"],
    ],
)
@pytest.mark.parametrize("folds", [["-1"], ["0,-1"], ["all,-2"], ["1.5"]])
def test_an_invalid_fold_is_a_usage_error_naming_it(tmp_path, run_cli, command, folds):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    result = run_cli(*args, "-w", tmp_path / "work", "--folds", *folds)
    assert result.exit_code == 2, result.output
    assert "is not a fold" in result.output and "fold_" not in result.output, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.zip").exists()


# --------------------------------------------------------------------------- files outside the dataset folder


def _plan(run_cli, dataset: Path, work: Path):
    return run_cli("plan", "-d", dataset, "-w", work, "-j", "1", "--no-progress", "--no-preprocess")


def test_symlinked_case_files_from_a_shared_store_are_read_like_copies(tmp_path, run_cli):
    copies = synthetic.write_nnunet_brain(tmp_path / "copies" / "Dataset001_Brain", 3, shape=SHAPE)
    linked = tmp_path / "linked" / "Dataset001_Brain"
    shutil.copytree(copies, linked)
    store = tmp_path / "store"
    shutil.copytree(copies, store)
    for folder in ("imagesTr", "labelsTr"):
        for path in (linked / folder).iterdir():
            path.unlink()
            path.symlink_to(store / folder / path.name)
    for dataset in (copies, linked):
        result = _plan(run_cli, dataset, tmp_path / f"work_{dataset.parent.name}")
        assert result.exit_code == 0, result.output
    fingerprints = [
        json.loads((tmp_path / f"work_{n}" / "Dataset001_Brain" / "fingerprint.json").read_text())
        for n in ("copies", "linked")
    ]
    assert fingerprints[0]["cases"] == fingerprints[1]["cases"]
    assert fingerprints[0]["content_hash"] == fingerprints[1]["content_hash"]


def test_a_broken_symlink_is_refused_by_case_and_file(tmp_path, run_cli):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset001_Brain", 3, shape=SHAPE)
    label = dataset / "labelsTr" / "BRATS_002.nii.gz"
    label.unlink()
    label.symlink_to(tmp_path / "gone" / "BRATS_002.nii.gz")
    result = _plan(run_cli, dataset, tmp_path / "work")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "case BRATS_002" in result.output and "BRATS_002.nii.gz" in result.output, result.output
    assert not (tmp_path / "work" / dataset.name).exists()


# --------------------------------------------------------------------------- folds that cannot exist


def _rewrite(path: Path, edit) -> None:
    image = nib.load(str(path))
    data = edit(np.asarray(image.dataobj).copy())
    nib.save(nib.Nifti1Image(data, image.affine, image.header), str(path))


def _edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_a_one_case_dataset_has_no_fold_that_validates_on_its_training_case(tmp_path, run_cli, caplog):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset009_One", 1, shape=SHAPE)
    work = tmp_path / "work"
    with caplog.at_level(logging.WARNING):
        report = plan_dataset(dataset_dir=dataset, workdir=work, workers=1, preprocess=False, show_progress=False)
    assert json.loads(report.workspace.splits.read_text())["folds"] == []
    assert any("too few for cross-validation" in w and "--fold all" in w for w in report.warnings)
    assert any("too few for cross-validation" in r.getMessage() for r in caplog.records)
    result = run_cli("train", "-w", work, "--fold", "0", "--device", "cpu", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "too few cases for cross-validation" in result.output and "--fold all" in result.output
    assert not (work / dataset.name / "models").exists()


def test_splits_whose_fold_validates_on_its_training_cases_are_refused(tmp_path, run_cli):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset009_Two", 2, shape=SHAPE)
    work = tmp_path / "work"
    report = plan_dataset(dataset_dir=dataset, workdir=work, workers=1, preprocess=False, show_progress=False)
    old_style = {
        "version": 1,
        "source": "kfold(seed=12345)",
        "folds": [{"train": ["BRATS_001", "BRATS_002"], "val": ["BRATS_001"]}],
    }
    report.workspace.splits.write_text(json.dumps(old_style))  # as planned before folds were checked
    result = run_cli("train", "-w", work, "--fold", "0", "--device", "cpu", "--no-progress")
    assert result.exit_code == 1 and "validates on case(s) it trains on: BRATS_001" in result.output, result.output
    plan_dataset(dataset_dir=dataset, workdir=work, workers=1, preprocess=False, show_progress=False)
    folds = json.loads(report.workspace.splits.read_text())["folds"]
    assert len(folds) == 2 and all(not set(f["train"]) & set(f["val"]) for f in folds)  # planning again repairs it


def test_a_shipped_splits_final_with_an_overlapping_fold_is_refused(tmp_path, run_cli):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset009_Three", 3, shape=SHAPE)
    (dataset / "splits_final.json").write_text(
        json.dumps(
            [
                {"train": ["BRATS_001", "BRATS_002"], "val": ["BRATS_003"]},
                {"train": ["BRATS_001", "BRATS_003"], "val": ["BRATS_003"]},
            ]
        )
    )
    result = _plan(run_cli, dataset, tmp_path / "work")
    assert result.exit_code == 1, result.output
    assert "splits_final.json: fold 1 validates on case(s) it trains on: BRATS_003" in result.output
    assert not (tmp_path / "work" / dataset.name).exists()


# --------------------------------------------------------------------------- doubtful but valid data


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("background", "every label map of the 3 case(s) is background only"),
        ("no enhancing", "label(s) 3 (enhancing tumour) appear in no case's label map"),
        ("blank T2", "channel 3 (T2w) holds one constant value in every case"),
        ("one blank T1", "channel 1 (T1w) holds one constant value in 1 case(s) (BRATS_002)"),
    ],
)
def test_doubtful_data_are_planned_with_a_warning(tmp_path, caplog, damage, expected):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset010_Doubtful", 3, shape=SHAPE)
    for i in (1, 2, 3):
        case = f"BRATS_00{i}"
        if damage == "background":
            _rewrite(dataset / "labelsTr" / f"{case}.nii.gz", np.zeros_like)
        elif damage == "no enhancing":
            _rewrite(dataset / "labelsTr" / f"{case}.nii.gz", lambda d: np.where(d == 3, 1, d).astype(d.dtype))
        elif damage == "blank T2":
            _rewrite(dataset / "imagesTr" / f"{case}_0003.nii.gz", np.zeros_like)
        elif case == "BRATS_002":
            _rewrite(dataset / "imagesTr" / f"{case}_0001.nii.gz", lambda d: np.full_like(d, 7))
    with caplog.at_level(logging.WARNING):
        report = plan_dataset(
            dataset_dir=dataset, workdir=tmp_path / "work", workers=1, preprocess=False, show_progress=False
        )
    assert [w for w in report.warnings if expected in w], report.warnings
    assert [r for r in caplog.records if expected in r.getMessage()]
    assert report.workspace.plans.is_file()


def test_clean_data_are_planned_without_doubts(tmp_path):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset011_Clean", 3, shape=SHAPE)
    report = plan_dataset(
        dataset_dir=dataset, workdir=tmp_path / "work", workers=1, preprocess=False, show_progress=False
    )
    assert report.warnings == []


def test_a_full_disk_is_one_line_and_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while saving a checkpoint: one line from the CLI wrapper, the previous file intact, no temp left."""
    import errno

    import torch
    import typer

    from autoseg.cli import user_errors
    from autoseg.core.checkpoint import load_checkpoint, save_checkpoint
    from autoseg.core.errors import storage_failure

    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, {"weights": {"w": torch.ones(3)}})
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):

            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device", str(file))

            handle.write = write
        return handle

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError) as caught:
        save_checkpoint(path, {"weights": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert storage_failure(caught.value).startswith("cannot write")
    assert torch.equal(load_checkpoint(path)["weights"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]

    @user_errors
    def command():
        raise RuntimeError("saving failed") from OSError(errno.EROFS, "Read-only file system", "/work/x.npy")

    with pytest.raises(typer.Exit) as exited:
        command()
    assert exited.value.exit_code == 1
    assert storage_failure(RuntimeError("boom")) is None


def test_numpys_short_write_on_a_full_disk_is_a_storage_failure():
    from autoseg.core.errors import storage_failure

    assert storage_failure(OSError("9216 requested and 7136 written")).startswith("cannot write: the disk is full")
    assert storage_failure(OSError("something else")) is None
