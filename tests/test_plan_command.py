"""`autoseg plan` end to end on every layout, asserting what lands in the work folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg.commands.plan import plan_dataset
from autoseg.core.plan import load_plan
from autoseg.data.io.images import read_label
from autoseg.phantoms import synthetic


def plan_cli(run_cli, dataset: Path, work: Path, *extra: str):
    result = run_cli("plan", "-d", dataset, "-w", work, "-j", "2", "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    return result


def read(path: Path):
    return json.loads(path.read_text())


def check_preprocessed(folder: Path, n_channels: int, allowed_labels: set[int]) -> None:
    cases = sorted(p.stem for p in folder.glob("*.json"))
    assert cases
    for case in cases:
        meta = read(folder / f"{case}.json")
        data = np.load(folder / f"{case}.npy", mmap_mode="r")
        seg = np.load(folder / f"{case}_seg.npy")
        assert data.dtype == np.float32 and data.shape == (n_channels, *meta["shape_after_resampling"])
        assert seg.shape == data.shape[1:]
        assert set(np.unique(seg).tolist()) <= allowed_labels | {-1, 0}
        for value, coords in meta["foreground_locations"].items():
            assert np.all(seg[tuple(np.asarray(coords).T)] == int(value))
    assert not list(folder.glob(".*.tmp")), "temporary files left behind"


def test_msd_brain(run_cli, msd_brain, tmp_path):
    work = tmp_path / "work"
    result = plan_cli(run_cli, msd_brain, work)
    root = work / "Task01_BrainTumour"
    assert "3d_fullres" in result.output and "5 cases" in result.output
    fp = read(root / "fingerprint.json")
    assert fp["channel_names"] == ["FLAIR", "T1w", "T1gd", "T2w"]
    assert len(fp["cases"]) == 5
    case = fp["cases"]["BRATS_001"]
    raw = nib.load(msd_brain / "labelsTr" / "BRATS_001.nii.gz").get_fdata()
    assert case["label_voxels"] == {str(v): int((raw == v).sum()) for v in (1, 2, 3) if (raw == v).any()}
    assert case["shape_before_crop"] == list(raw.shape[::-1])
    assert all(a <= b for a, b in zip(case["shape_after_crop"], case["shape_before_crop"]))
    assert fp["median_relative_size_after_crop"] < 0.75
    stats = fp["foreground_intensities"][0]
    assert stats["percentile_00_5"] <= stats["median"] <= stats["percentile_99_5"]

    plan = load_plan(root / "plans.json")
    full = plan.configurations["3d_fullres"]
    assert plan.transpose_forward == [0, 1, 2]
    assert all(n.scheme == "zscore" and n.use_mask for n in full.normalization)
    assert all(
        p % d == 0
        for p, d in zip(full.patch_size, [2 ** sum(s[a] == 2 for s in full.network.strides) for a in range(3)])
    )

    splits = read(root / "splits.json")["folds"]
    assert len(splits) == 5
    assert sorted(c for f in splits for c in f["val"]) == sorted(fp["cases"])
    for fold in splits:
        assert not set(fold["train"]) & set(fold["val"])

    folder = root / "preprocessed" / "3d_fullres"
    check_preprocessed(folder, 4, {1, 2, 3})
    data = np.load(folder / "BRATS_001.npy")
    seg = np.load(folder / "BRATS_001_seg.npy")
    inside = seg >= 0
    assert np.all(data[:, ~inside] == 0)  # masked z-score: background stays 0
    assert abs(float(data[0][inside].mean())) < 0.05
    assert plan.configurations["2d"].data_identifier == "3d_fullres"  # isotropic: 2d reuses the 3D data
    assert not (root / "preprocessed" / "2d").exists()


def test_anisotropic_ct(run_cli, nnunet_ct, tmp_path):
    work = tmp_path / "work"
    plan_cli(run_cli, nnunet_ct, work)
    root = work / "Dataset003_Liver"
    plan = load_plan(root / "plans.json")
    full = plan.configurations["3d_fullres"]
    fp = read(root / "fingerprint.json")
    spacings = np.array([c["spacing"] for c in fp["cases"].values()])
    assert full.spacing[0] == pytest.approx(np.percentile(spacings[:, 0], 10))
    assert full.spacing[1:] == pytest.approx([0.8, 0.8])
    assert full.network.kernel_sizes[0] == [1, 3, 3]
    assert full.normalization[0].scheme == "ct"
    assert plan.configurations["2d"].data_identifier == "2d"  # slices keep their own spacing in 2d
    folder = root / "preprocessed" / "3d_fullres"
    check_preprocessed(folder, 1, {1, 2})
    for case_id, case in fp["cases"].items():
        meta = read(folder / f"{case_id}.json")
        expected_z = round(case["shape_after_crop"][0] * case["spacing"][0] / full.spacing[0])
        assert meta["shape_after_resampling"][0] == expected_z
    data = np.load(folder / "CT_001.npy")
    norm = full.normalization[0]
    assert data.max() <= (norm.upper - norm.mean) / norm.std + 1e-4  # clipped
    check_preprocessed(root / "preprocessed" / "2d", 1, {1, 2})


def test_brats_layout_maps_labels_and_declares_regions(run_cli, brats, tmp_path):
    work = tmp_path / "work"
    plan_cli(run_cli, brats, work)
    root = work / "BraTS2021"
    plan = load_plan(root / "plans.json")
    assert [(r.name, r.labels, r.paint_value) for r in plan.regions] == [
        ("whole tumor", [1, 2, 3], 1),
        ("tumor core", [2, 3], 2),
        ("enhancing tumor", [3], 3),
    ]
    assert plan.output_label_values == {"0": 0, "1": 2, "2": 1, "3": 4}
    case = "BraTS2021_00000"
    raw, _ = read_label(brats / case / f"{case}_seg.nii.gz")
    voxels = read(root / "fingerprint.json")["cases"][case]["label_voxels"]
    assert voxels == {"1": int((raw == 2).sum()), "2": int((raw == 1).sum()), "3": int((raw == 4).sum())}
    seg = np.load(root / "preprocessed" / "3d_fullres" / f"{case}_seg.npy")
    assert 4 not in np.unique(seg)
    assert (seg == 3).sum() == (raw == 4).sum()  # 1 mm data: no resampling, exact counts


def test_dicom_series_dataset(run_cli, dicom_brain, tmp_path):
    work = tmp_path / "work"
    plan_cli(run_cli, dicom_brain, work)
    root = work / "DicomBrain"
    fp = read(root / "fingerprint.json")
    assert fp["channel_names"] == ["FLAIR", "T1w"]
    assert next(iter(fp["cases"].values()))["spacing"] == pytest.approx([2.0, 1.0, 1.0])
    check_preprocessed(root / "preprocessed" / "3d_fullres", 2, {1, 2, 3})


def test_fingerprint_reused_until_data_change(msd_brain, tmp_path):
    work = tmp_path / "work"
    first = plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False)
    assert not first.fingerprint_reused and first.preprocessed == {"3d_fullres": 5}
    again = plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False)
    assert again.fingerprint_reused and again.preprocessed == {"3d_fullres": 0}
    forced = plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False, force=True, preprocess=False)
    assert not forced.fingerprint_reused
    image = nib.load(msd_brain / "imagesTr" / "BRATS_002.nii.gz")
    changed = nib.Nifti1Image(image.get_fdata(dtype=np.float32) * 2, image.affine, image.header)
    nib.save(changed, msd_brain / "imagesTr" / "BRATS_002.nii.gz")
    after_change = plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False, preprocess=False)
    assert not after_change.fingerprint_reused


def test_splits_stay_stable_when_cases_are_added_or_removed(tmp_path):
    """A case a trained fold learned from must never become that fold's validation case."""
    from autoseg.data.io.splits import kfold_splits, updated_splits
    from autoseg.phantoms import synthetic

    ids = [f"c{i:02d}" for i in range(12)]
    document = {"version": 1, "source": "kfold", "folds": kfold_splits(ids)}
    grown, added, removed = updated_splits(document, [*ids[1:], "new_a", "new_b"])
    assert (added, removed) == (["new_a", "new_b"], ["c00"])
    for old, new in zip(document["folds"], grown["folds"]):
        assert set(old["val"]) - {"c00"} <= set(new["val"])  # every remaining case keeps its fold
        assert set(new["train"]) | set(new["val"]) == set(ids[1:]) | {"new_a", "new_b"}
        assert not set(new["train"]) & set(new["val"])
    assert sorted(c for f in grown["folds"] for c in f["val"]) == sorted([*ids[1:], "new_a", "new_b"])
    assert updated_splits(grown, [*ids[1:], "new_a", "new_b"])[0] is grown  # unchanged: left alone

    dataset = synthetic.write_msd_brain(tmp_path / "Task01", 7, shape=(16, 18, 20))
    work = tmp_path / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, preprocess=False, show_progress=False)
    before = json.loads((work / "Task01" / "splits.json").read_text())["folds"]
    meta = json.loads((dataset / "dataset.json").read_text())
    dropped = meta["training"].pop(0)
    (dataset / dropped["image"]).unlink()
    (dataset / dropped["label"]).unlink()
    meta["numTraining"] -= 1
    (dataset / "dataset.json").write_text(json.dumps(meta))
    plan_dataset(dataset_dir=dataset, workdir=work, preprocess=False, show_progress=False)
    after = json.loads((work / "Task01" / "splits.json").read_text())["folds"]
    gone = Path(dropped["image"]).name.removesuffix(".nii.gz")
    assert [[c for c in f["val"] if c != gone] for f in before] == [f["val"] for f in after]


def test_another_dataset_of_the_same_name_cannot_replace_trained_models(tmp_path, run_cli):
    from autoseg.phantoms import synthetic

    brain = synthetic.write_msd_brain(tmp_path / "a" / "Study", 5, shape=(16, 18, 20))
    work = tmp_path / "work"
    plan_dataset(dataset_dir=brain, workdir=work, preprocess=False, show_progress=False)
    fold = work / "Study" / "models" / "3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pt").write_bytes(b"trained weights")
    plan_dataset(dataset_dir=brain, workdir=work, preprocess=False, show_progress=False)  # the same data: fine
    ct = synthetic.write_nnunet_ct(tmp_path / "b" / "Study", 5)
    result = run_cli("plan", "-d", ct, "-w", work, "--no-preprocess", "--no-progress")
    assert result.exit_code == 1 and "models trained on another dataset named Study" in result.output
    assert "FLAIR" in json.loads((work / "Study" / "dataset.json").read_text())["channel_names"][0]


def test_interrupted_preprocessing_resumes(msd_brain, tmp_path):
    work = tmp_path / "work"
    plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False)
    folder = work / "Task01_BrainTumour" / "preprocessed" / "3d_fullres"
    (folder / "BRATS_003.json").unlink()  # as if killed before the case finished
    (folder / "BRATS_004_seg.npy").unlink()
    report = plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False)
    assert report.preprocessed == {"3d_fullres": 2}
    check_preprocessed(folder, 4, {1, 2, 3})


def test_a_case_whose_arrays_do_not_match_its_record_is_preprocessed_again(msd_brain, tmp_path):
    work = tmp_path / "work"
    plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False)
    folder = work / "Task01_BrainTumour" / "preprocessed" / "3d_fullres"
    # a worker of an earlier, killed run replaced the arrays after the record was written
    np.save(folder / "BRATS_001.npy", np.zeros((4, 5, 6, 7), np.float32))
    seg = (folder / "BRATS_002_seg.npy").read_bytes()
    (folder / "BRATS_002_seg.npy").write_bytes(seg[: len(seg) // 2])  # cut short
    report = plan_dataset(dataset_dir=msd_brain, workdir=work, show_progress=False)
    assert report.preprocessed == {"3d_fullres": 2}
    check_preprocessed(folder, 4, {1, 2, 3})


def test_killed_plan_leaves_no_worker_running_and_the_rerun_finishes(tmp_path, process_watch, run_cli):
    """``kill -9`` of the main process only, while its two workers preprocess (as a machine kills)."""
    dataset = synthetic.write_msd_brain(tmp_path / "Task01_BrainTumour", 12, shape=(48, 56, 52))
    work = tmp_path / "work"
    folder = work / "Task01_BrainTumour" / "preprocessed" / "3d_fullres"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoseg.cli",
            "plan",
            "-d",
            str(dataset),
            "-w",
            str(work),
            "-j",
            "2",
            "--configs",
            "3d_fullres",
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        process_watch.wait_until(
            lambda: folder.is_dir() and process_watch.record(process.pid),
            process,
            timeout=120,
            what="the preprocessing workers started",
        )
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not process_watch.wait_all_ended(timeout=5), "workers of the killed plan still run"
    plan_cli(run_cli, dataset, work, "--configs", "3d_fullres")
    check_preprocessed(folder, 4, {1, 2, 3})
    assert len(list(folder.glob("*.json"))) == 12


def test_no_preprocess_and_config_selection(run_cli, msd_brain, tmp_path):
    work = tmp_path / "work"
    plan_cli(run_cli, msd_brain, work, "--no-preprocess", "--configs", "2d")
    root = work / "Task01_BrainTumour"
    assert list(load_plan(root / "plans.json").configurations) == ["2d"]
    assert not (root / "preprocessed").exists()


def test_summary_and_info_print_network_size(run_cli, msd_brain, tmp_path):
    work = tmp_path / "work"
    result = plan_cli(run_cli, msd_brain, work, "--no-preprocess")
    assert "parameters" in result.output
    info = run_cli("info", "-w", work)
    assert "Task01_BrainTumour: network parameters 3d_fullres" in info.output
