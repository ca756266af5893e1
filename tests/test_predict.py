"""`autoseg predict`: every input layout, exact geometry, fold ensemble, TTA, resume, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg.commands.plan import plan_dataset
from autoseg.commands.predict import predict_folder
from autoseg.data.evaluation.metrics import dice
from autoseg.inference.predictor import Predictor
from autoseg.phantoms import synthetic
from autoseg.training.trainer import train_fold

pytestmark = pytest.mark.slow  # the `trained` phantom model and `held_out` cases are in conftest.py


def assert_same_geometry(prediction: Path, source: Path) -> None:
    pred, image = nib.load(prediction), nib.load(source)
    assert pred.shape == image.shape[:3]
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
    assert int(pred.header["qform_code"]) == int(image.header["qform_code"])
    assert int(pred.header["sform_code"]) == int(image.header["sform_code"])
    assert pred.get_data_dtype() == np.uint8


def edema_dice(prediction: Path, truth: Path) -> float:
    return dice(nib.load(prediction).get_fdata() == 1, nib.load(truth).get_fdata() == 1)


def test_msd_4d_input_two_fold_ensemble(trained, held_out, tmp_path, run_cli):
    out = tmp_path / "masks"
    result = run_cli(
        "predict",
        "-w",
        trained,
        "-i",
        held_out / "imagesTr",
        "-o",
        out,
        "--folds",
        "0",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "3 written" in result.output
    for case in ("BRATS_001", "BRATS_002", "BRATS_003"):
        assert_same_geometry(out / f"{case}.nii.gz", held_out / "imagesTr" / f"{case}.nii.gz")
    scored = run_cli(
        "evaluate", "-p", out, "-g", held_out / "labelsTr", "--dataset-json", held_out / "dataset.json", "--no-progress"
    )
    assert scored.exit_code == 0, scored.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cases"]) == 3
    assert min(case["edema"]["dice"] for case in summary["cases"].values()) > 0.6, summary["mean"]


def test_channel_files_and_brats_folders_give_the_same_masks(trained, held_out, tmp_path):
    predictor = Predictor.from_workdir(trained, folds=[0], device="cpu")
    reference = tmp_path / "ref"
    predict_folder(predictor, held_out / "imagesTr", reference, show_progress=False)
    channels, brats = tmp_path / "channels", tmp_path / "brats"
    channels.mkdir()
    for case in ("BRATS_001", "BRATS_002"):
        image = nib.load(held_out / "imagesTr" / f"{case}.nii.gz")
        data = image.get_fdata(dtype=np.float32)
        (brats / case).mkdir(parents=True)
        for c, suffix in enumerate(("flair", "t1", "t1ce", "t2")):
            volume = nib.Nifti1Image(data[..., c], image.affine, image.header)
            nib.save(volume, channels / f"{case}_{c:04d}.nii.gz")
            nib.save(volume, brats / case / f"{case}_{suffix}.nii.gz")
    single = channels / "BRATS_002_0001.nii.gz"  # one channel file stands for its case and brings the others
    for source, out, cases in (
        (channels, tmp_path / "out_channels", ["BRATS_001", "BRATS_002"]),
        (brats, tmp_path / "out_brats", ["BRATS_001", "BRATS_002"]),
        (single, tmp_path / "out_single", ["BRATS_002"]),
    ):
        report = predict_folder(predictor, source, out, show_progress=False)
        assert report.written == cases
        for case in report.written:
            assert_same_geometry(out / f"{case}.nii.gz", held_out / "imagesTr" / f"{case}.nii.gz")
            np.testing.assert_array_equal(
                nib.load(out / f"{case}.nii.gz").get_fdata(), nib.load(reference / f"{case}.nii.gz").get_fdata()
            )


def test_tta_off_still_segments_and_single_file_input(trained, held_out, tmp_path):
    predictor = Predictor.from_workdir(trained, folds=["0"], device="cpu", tta=False)
    source = held_out / "imagesTr" / "BRATS_002.nii.gz"
    report = predict_folder(predictor, source, tmp_path, show_progress=False)
    assert report.written == ["BRATS_002"]
    assert edema_dice(tmp_path / "BRATS_002.nii.gz", held_out / "labelsTr" / "BRATS_002.nii.gz") > 0.5


def test_top_level_python_api_loads_once_and_predicts_arrays_repeatedly(trained, held_out):
    import autoseg
    from autoseg.data.io.images import read_channels

    predictor = autoseg.load_predictor(trained, device="cpu", tta=False)  # both trained folds
    assert isinstance(predictor, autoseg.Predictor) and len(predictor.members[0].models) == 2
    for case in ("BRATS_001", "BRATS_003"):
        image, geometry = read_channels([held_out / "imagesTr" / f"{case}.nii.gz"])
        labels = predictor.predict_array(image, geometry)
        truth = read_channels([held_out / "labelsTr" / f"{case}.nii.gz"])[0][0]  # (z, y, x) like the image
        assert labels.shape == truth.shape and dice(labels == 1, truth == 1) > 0.5


def test_resume_skips_done_cases_and_failures_do_not_stop_others(trained, held_out, tmp_path, run_cli):
    source = tmp_path / "in"
    shutil.copytree(held_out / "imagesTr", source)
    three_channels = nib.load(source / "BRATS_003.nii.gz")
    nib.save(nib.Nifti1Image(three_channels.get_fdata()[..., :3], three_channels.affine), source / "BRATS_003.nii.gz")
    (source / "BRATS_000.nii.gz").write_bytes(b"not an image")  # nibabel's own error type, not an OSError
    out = tmp_path / "out"
    out.mkdir()
    (out / "BRATS_001.nii.gz").write_bytes(b"done before")
    result = run_cli(
        "predict", "-w", trained, "-i", source, "-o", out, "--folds", "0", "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1
    assert "1 written, 1 skipped" in result.output and "2 failed" in result.output
    assert "BRATS_003" in result.output and "3 channel(s)" in result.output
    assert "BRATS_000: BRATS_000.nii.gz is not a readable image" in result.output
    assert (out / "BRATS_001.nii.gz").read_bytes() == b"done before"
    assert (out / "BRATS_002.nii.gz").is_file() and not (out / "BRATS_003.nii.gz").exists()
    assert not list(out.glob(".*.tmp"))


def test_nan_voxels_fail_their_case_by_name_unless_replaced_on_request(trained, held_out, tmp_path, run_cli):
    from autoseg.core.errors import DatasetError
    from autoseg.data.io.images import read_channels

    source = tmp_path / "in"
    shutil.copytree(held_out / "imagesTr", source)
    image = nib.load(source / "BRATS_002.nii.gz")
    data = image.get_fdata(dtype=np.float32)
    data[16, 20, 18, 1] = np.nan  # inside the head: one NaN used to turn the whole mask into background
    data[3, 4, 5, 2] = np.inf
    nib.save(nib.Nifti1Image(data, image.affine, image.header), source / "BRATS_002.nii.gz")
    out = tmp_path / "out"
    args = (
        "predict",
        "-w",
        trained,
        "-i",
        source,
        "-o",
        out,
        "--folds",
        "0",
        "--device",
        "cpu",
        "--no-tta",
        "--no-progress",
    )
    refused = run_cli(*args)
    assert refused.exit_code == 1, refused.output
    assert "2 written, 0 skipped (already there), 1 failed" in refused.output
    assert (
        "BRATS_002: image has 2 NaN/Inf voxel(s) in channel(s) [1, 2]; fix the scan, or predict with "
        "--nan-to-num" in refused.output
    )
    assert not (out / "BRATS_002.nii.gz").exists()

    repaired = run_cli(*args, "--nan-to-num")
    assert repaired.exit_code == 0, repaired.output
    assert "1 written, 2 skipped" in repaired.output
    assert (
        "BRATS_002: replaced 2 NaN/Inf voxel(s) in channel(s) [1, 2] (NaN and -Inf by the channel's minimum, "
        "+Inf by its maximum)" in repaired.output
    )
    predictor = Predictor.from_workdir(trained, folds=[0], device="cpu", tta=False)
    clean, geometry = read_channels([held_out / "imagesTr" / "BRATS_002.nii.gz"])
    expected = predictor.predict_array(clean, geometry)
    mask = np.asarray(nib.load(out / "BRATS_002.nii.gz").dataobj).transpose(2, 1, 0)
    assert (mask > 0).sum() > 100 and dice(mask == 1, expected == 1) > 0.95

    poisoned, _ = read_channels([source / "BRATS_002.nii.gz"])
    with pytest.raises(DatasetError, match=r"2 NaN/Inf voxel\(s\)"):  # the Python API refuses them as well
        predictor.predict_array(poisoned, geometry)


def test_a_lying_header_fails_its_case_at_once_naming_file_and_shape(trained, held_out, tmp_path, run_cli):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(held_out / "imagesTr" / "BRATS_001.nii.gz", source)
    synthetic.write_lying_nifti(source / "BRATS_009.nii.gz")
    result = run_cli(
        "predict",
        "-w",
        trained,
        "-i",
        source,
        "-o",
        tmp_path / "out",
        "--folds",
        "0",
        "--device",
        "cpu",
        "--no-tta",
        "--no-progress",
    )
    assert result.exit_code == 1, result.output
    assert "1 written, 0 skipped (already there), 1 failed" in result.output
    assert (
        "BRATS_009: BRATS_009.nii.gz: truncated file: the header declares shape 1024x1024x512 float32" in result.output
    )
    assert not (tmp_path / "out" / "BRATS_009.nii.gz").exists()


def test_a_killed_run_resumes_where_it_stopped_and_leaves_no_partial_files(trained, held_out, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    (out / ".BRATS_003.nii.gz.x1y2.tmp").write_bytes(b"half a mask")  # what a kill during a write leaves
    command = [
        sys.executable,
        "-m",
        "autoseg.cli",
        "predict",
        "-w",
        str(trained),
        "-i",
        str(held_out / "imagesTr"),
        "-o",
        str(out),
        "--folds",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    root = Path(__file__).resolve().parents[1]
    worker = subprocess.Popen(
        command,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and worker.poll() is None and not (out / "BRATS_001.nii.gz").exists():
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done = sorted(p.name for p in out.glob("BRATS_*.nii.gz"))
    assert "BRATS_001.nii.gz" in done and len(done) < 3, done
    first = (out / "BRATS_001.nii.gz").stat().st_mtime_ns

    predictor = Predictor.from_workdir(trained, folds=[0], device="cpu")
    report = predict_folder(predictor, held_out / "imagesTr", out, show_progress=False)
    assert report.skipped == [n.removesuffix(".nii.gz") for n in done] and not report.failed
    assert sorted(p.name for p in out.iterdir()) == [
        "BRATS_001.nii.gz",
        "BRATS_002.nii.gz",
        "BRATS_003.nii.gz",
        "report.json",
    ]
    assert (out / "BRATS_001.nii.gz").stat().st_mtime_ns == first  # not predicted again
    for case in ("BRATS_002", "BRATS_003"):
        assert_same_geometry(out / f"{case}.nii.gz", held_out / "imagesTr" / f"{case}.nii.gz")


def test_missing_model_is_a_clear_error(held_out, tmp_path, run_cli):
    result = run_cli("predict", "-w", tmp_path / "empty", "-i", held_out / "imagesTr", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "no planned dataset" in result.output


def test_a_fold_listed_twice_is_an_error_not_a_double_weight(trained, held_out, tmp_path, run_cli):
    result = run_cli("predict", "-w", trained, "-i", held_out / "imagesTr", "-o", tmp_path / "o", "--folds", "0,1,0")
    assert result.exit_code == 1 and "fold(s) 0 listed more than once" in result.output


def test_output_that_is_a_file_or_the_input_folder_is_a_clear_error(trained, held_out, tmp_path, run_cli):
    (tmp_path / "masks").write_text("a file")
    expected = {
        tmp_path / "masks": "is a file, not a folder",
        tmp_path / "mask.nii.gz": "looks like a file",
        held_out / "imagesTr": "is the input folder",
    }
    for output, message in expected.items():
        result = run_cli("predict", "-w", trained, "-i", held_out / "imagesTr", "-o", output, "--no-progress")
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "mask.nii.gz").exists()
    assert sorted(p.name for p in (held_out / "imagesTr").iterdir()) == [f"BRATS_00{i}.nii.gz" for i in (1, 2, 3)]


def test_an_output_folder_that_cannot_be_written_fails_before_the_first_case(trained, held_out, monkeypatch, run_cli):
    """/proc takes no new files or folders, even from root (whom permission bits would not stop)."""
    predicted = []
    monkeypatch.setattr(Predictor, "predict_case", lambda self, case, *args: predicted.append(case.case_id))
    expected = {
        "/proc/autoseg-masks": "cannot create folder /proc/autoseg-masks",
        "/proc": "cannot write to folder /proc",
    }
    for output, message in expected.items():
        result = run_cli(
            "predict", "-w", trained, "-i", held_out / "imagesTr", "-o", output, "--device", "cpu", "--no-progress"
        )
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
        assert result.output.count("Error:") == 1
    assert predicted == []  # the network ran on no case


def test_probabilities_saved_on_the_input_grid(trained, held_out, tmp_path, run_cli):
    result = run_cli(
        "predict",
        "-w",
        trained,
        "-i",
        held_out / "imagesTr" / "BRATS_001.nii.gz",
        "-o",
        tmp_path,
        "--folds",
        "0",
        "--fast",
        "--save-probabilities",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "BRATS_001.npz")
    probabilities = saved["probabilities"]
    mask = nib.load(tmp_path / "BRATS_001.nii.gz").get_fdata().transpose(2, 1, 0)  # npz is (K, z, y, x)
    assert probabilities.dtype == np.float16 and probabilities.shape == (4, *mask.shape)
    assert list(saved["classes"]) == ["background", "edema", "non-enhancing tumour", "enhancing tumour"]
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1, atol=2e-3)
    assert (probabilities.argmax(0) == mask).mean() > 0.999


def test_bf16_on_cpu_agrees_with_fp32(trained, held_out, tmp_path, run_cli):
    """``--precision bf16`` is opt-in for speed; its masks must match fp32's almost everywhere."""
    for precision in ("fp32", "bf16"):
        result = run_cli(
            "predict",
            "-w",
            trained,
            "-i",
            held_out / "imagesTr",
            "-o",
            tmp_path / precision,
            "--folds",
            "0",
            "--no-tta",
            "--precision",
            precision,
            "--device",
            "cpu",
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
    for case in ("BRATS_001", "BRATS_002", "BRATS_003"):
        fp32 = nib.load(tmp_path / "fp32" / f"{case}.nii.gz").get_fdata()
        bf16 = nib.load(tmp_path / "bf16" / f"{case}.nii.gz").get_fdata()
        assert dice(bf16 > 0, fp32 > 0) > 0.97
        for label in np.unique(fp32)[1:]:
            assert dice(bf16 == label, fp32 == label) > 0.9, (case, label)


@pytest.fixture(scope="module")
def trained_ct(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ct")
    dataset = synthetic.write_nnunet_ct(root / "Dataset003_Liver", 5)
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    train_fold(
        workdir=work, fold="0", epochs=1, iterations=2, val_iterations=1, workers=0, device="cpu", show_progress=False
    )
    return work, dataset


def test_anisotropic_oblique_ct_and_dicom_geometry_round_trip(trained_ct, tmp_path):
    import SimpleITK as sitk

    work, dataset = trained_ct
    predictor = Predictor.from_workdir(work, device="cpu", tta=False)
    source = dataset / "imagesTr" / "CT_002_0000.nii.gz"
    out = tmp_path / "nifti"
    assert predict_folder(predictor, source, out, show_progress=False).written == ["CT_002"]  # named as in a folder
    assert_same_geometry(out / "CT_002.nii.gz", source)

    volume = nib.load(source).get_fdata().transpose(2, 1, 0)  # (z, y, x)
    series = tmp_path / "dicom" / "CT_009"
    synthetic.write_dicom_series(volume, (4.0, 0.8, 0.8), series, origin=(-12.5, 40.0, 7.0))
    report = predict_folder(predictor, tmp_path / "dicom", tmp_path / "from_dicom", show_progress=False)
    assert report.written == ["CT_009"], report.failed
    mask = sitk.ReadImage(str(tmp_path / "from_dicom" / "CT_009.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    image = reader.Execute()
    assert mask.GetSize() == image.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5)


def test_a_full_disk_stops_predict_with_one_line_and_keeps_the_finished_cases(
    trained, held_out, tmp_path, run_cli, monkeypatch
):
    """A full disk would fail every later case too: the run stops at the first, in one line."""
    import errno

    from autoseg.inference import predictor as predictor_module

    written = []

    def full_after_one(mask, geometry, path):
        written.append(path.name)
        if len(written) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write_label(mask, geometry, path)

    real_write_label = predictor_module.write_label
    monkeypatch.setattr(predictor_module, "write_label", full_after_one)
    out = tmp_path / "out"
    result = run_cli(
        "predict",
        "-w",
        trained,
        "-i",
        held_out / "imagesTr",
        "-o",
        out,
        "--folds",
        "0",
        "--no-tta",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        line for line in result.output.splitlines() if "No space left" in line
    ]
    assert len(written) == 2  # the third case was not tried
    assert sorted(p.name for p in out.iterdir()) == [written[0], "report.json"]  # nothing half-written
