"""Real scans, shipped with the tests (tests/data/real, licence notes beside them): MSD Hippocampus MRI end
to end through the CLI, and TotalSegmentator's CT and MR with 23 and 41 classes for geometry, evaluation,
DICOM-SEG and quality control.

Real files are what phantoms are not: float32 and uint8 images in one dataset, float32 label files,
intensity maxima from about 100 to over a million, left-right flipped affines, non-consecutive label
values. Every expected value here is computed from the files with nibabel, SimpleITK or numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from autoseg.data.io.images import read_channels, read_geometry, read_label

DATA = Path(__file__).resolve().parent / "data" / "real"
HIPPOCAMPUS = DATA / "hippocampus"
TOTALSEG = DATA / "totalsegmentator"
#: TotalSegmentator's pairs: (image, segmentation, foreground classes in the segmentation)
CT = ("example_ct_sm.nii.gz", "example_seg.nii.gz", 41)
MR = ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", 23)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
TINY_TRAINING = ["--iterations", "2", "--val-iterations", "1", "--workers", "0", "--device", "cpu", "--no-progress"]


def hippocampus_cases() -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))


def stored(path: Path) -> np.ndarray:
    """The voxels as nibabel reads them (scaling applied), in the file's dtype where unscaled."""
    return np.asanyarray(nib.load(path).dataobj)


def foreground_values(path: Path) -> list[int]:
    return [int(v) for v in np.unique(stored(path)) if v != 0]


def test_the_shipped_cases_are_the_real_world_mix():
    """The data are what the tests claim: both image dtypes, float32 labels, maxima over four decades."""
    cases = hippocampus_cases()
    listed = json.loads((HIPPOCAMPUS / "dataset.json").read_text(encoding="utf-8"))["training"]
    assert sorted(Path(e["image"]).name.removesuffix(".nii.gz") for e in listed) == cases and len(cases) == 8
    image_types = {nib.load(HIPPOCAMPUS / "imagesTr" / f"{c}.nii.gz").get_data_dtype() for c in cases}
    label_types = {nib.load(HIPPOCAMPUS / "labelsTr" / f"{c}.nii.gz").get_data_dtype() for c in cases}
    assert {np.dtype(np.float32), np.dtype(np.uint8)} <= image_types and np.dtype(np.float32) in label_types
    maxima = [float(stored(HIPPOCAMPUS / "imagesTr" / f"{c}.nii.gz").max()) for c in cases]
    assert min(maxima) < 300 and max(maxima) > 1e6
    assert [len(foreground_values(TOTALSEG / seg)) for _, seg, _ in (CT, MR)] == [CT[2], MR[2]]
    for folder in (HIPPOCAMPUS, TOTALSEG):
        assert "Licence" in (folder / "README.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- geometry


REAL_FILES = [
    *(TOTALSEG / name for pair in (CT, MR) for name in pair[:2]),
    HIPPOCAMPUS / "imagesTr" / "hippocampus_033.nii.gz",  # uint8
    HIPPOCAMPUS / "imagesTr" / "hippocampus_210.nii.gz",  # float32, maximum 1.7e6
    HIPPOCAMPUS / "labelsTr" / "hippocampus_003.nii.gz",  # a float32 label file
]


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_files_are_read_with_the_exact_geometry_and_values(path: Path):
    """autoseg's reader against nibabel (shape, zooms, affine) and SimpleITK (spacing, origin, direction)."""
    data, geometry = read_channels([path])
    image = nib.load(path)
    assert geometry.shape == image.shape[::-1] and data.shape == (1, *image.shape[::-1])
    np.testing.assert_array_equal(geometry.spacing, image.header.get_zooms()[::-1])
    direction = np.reshape(geometry.direction, (3, 3))
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ direction * np.asarray(geometry.spacing[::-1])
    affine[:3, 3] = RAS_TO_LPS @ np.asarray(geometry.origin)
    np.testing.assert_allclose(affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(data[0], stored(path).astype(np.float32).transpose(2, 1, 0))

    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(geometry.spacing, itk.GetSpacing()[::-1], rtol=1e-6)
    np.testing.assert_allclose(geometry.origin, itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(geometry.direction, itk.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(data[0], sitk.GetArrayFromImage(itk).astype(np.float32))
    assert read_geometry(path) == geometry


def test_a_float32_label_file_reads_as_whole_labels():
    path = HIPPOCAMPUS / "labelsTr" / "hippocampus_003.nii.gz"
    assert nib.load(path).get_data_dtype() == np.float32
    labels, _ = read_label(path)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, stored(path).transpose(2, 1, 0))
    assert set(np.unique(labels).tolist()) == {0, 1, 2}


# --------------------------------------------------------------------------- MSD Hippocampus end to end


REPORT_KEYS = {"flags", "input", "intensities", "volumes", "passes", "seconds"}  # docs/trust.md, without options
#: docs/trust.md's QC flags without --uncertainty (a tiny model's masks may raise any of them)
FLAGS = {"spacing", "field_of_view", "intensity_range", "intensity_profile", "swapped_channels"}
FLAGS |= {"empty_structure", "volume"}
HIPPOCAMPUS_LABELS = {"Anterior": 1, "Posterior": 2}


def voxel_ml(path: Path) -> float:
    return float(np.prod(nib.load(path).header.get_zooms()[:3])) / 1000


def assert_on_the_input_grid(mask_path: Path, image_path: Path) -> None:
    mask, image = nib.load(mask_path), nib.load(image_path)
    assert mask.shape == image.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, image.affine)
    assert mask.header.get_zooms() == image.header.get_zooms()
    codes = ("qform_code", "sform_code")
    assert [int(mask.header[k]) for k in codes] == [int(image.header[k]) for k in codes]
    assert set(np.unique(stored(mask_path)).tolist()) <= {0, *HIPPOCAMPUS_LABELS.values()}


def assert_report_describes(entry: dict, image_path: Path, mask_path: Path, n_training: int) -> None:
    """A case's report.json entry: its keys, flags, input geometry, intensities in the file's own units
    (uint8 or float32 up to 1.7e6), and the predicted volumes of the mask written."""
    assert REPORT_KEYS <= set(entry)
    assert {f["flag"] for f in entry["flags"]} <= FLAGS and all(f["reason"] for f in entry["flags"])
    image = nib.load(image_path)
    assert entry["input"]["shape"] == list(image.shape[::-1])
    assert entry["input"]["spacing"] == [float(z) for z in image.header.get_zooms()[::-1]]
    assert entry["input"]["orientation"] == "".join(nib.aff2axcodes(image.affine))
    body = stored(image_path)[stored(image_path) != 0].astype(np.float64)
    measured = entry["intensities"]["MRI"]
    assert measured["median"] == pytest.approx(np.median(body), rel=0.05)
    assert measured["p99"] == pytest.approx(np.quantile(body, 0.99), rel=0.05)
    mask = stored(mask_path)
    expected_ml = {name: (mask == value).sum() * voxel_ml(mask_path) for name, value in HIPPOCAMPUS_LABELS.items()}
    assert {n: v["volume_ml"] for n, v in entry["volumes"].items()} == pytest.approx(expected_ml)
    assert {v["training_cases_with_it"] for v in entry["volumes"].values()} == {f"{n_training}/{n_training}"}


def test_hippocampus_plan_train_predict_evaluate(tmp_path: Path, run_cli):
    """A user's first run on real MRI (mixed dtypes, float32 labels, maxima 127 to 1.7e6): every mask sits on
    its input's grid with the dataset's labels, report.json describes every case, evaluate scores every case."""
    work, out, cases = tmp_path / "work", tmp_path / "masks", hippocampus_cases()
    planned = run_cli("plan", "-d", HIPPOCAMPUS, "-w", work, "-c", "3d_fullres", "--no-progress")
    assert planned.exit_code == 0, planned.output
    trained = run_cli("train", "-w", work, "--fold", "0", "--epochs", "1", "--no-validate", *TINY_TRAINING)
    assert trained.exit_code == 0, trained.output
    predicted = run_cli(
        "predict", "-w", work, "-i", HIPPOCAMPUS / "imagesTr", "-o", out, "--folds", "0", "--device", "cpu",
        "--no-tta", "--no-progress",
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    assert f"{len(cases)} written, 0 skipped (already there), 0 failed" in predicted.output
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["cases"]) == cases
    for case in cases:
        image, mask = HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", out / f"{case}.nii.gz"
        assert_on_the_input_grid(mask, image)
        assert_report_describes(report["cases"][case], image, mask, len(cases))
    training = report["cases"][cases[0]]["intensities"]["MRI"]["training"]["p99"]
    assert training[0] < 300 and training[1] > 1e5  # the uint8 and the 1e6 cases both in the reference

    scored = run_cli(
        "evaluate", "-p", out, "-g", HIPPOCAMPUS / "labelsTr", "--dataset-json", HIPPOCAMPUS / "dataset.json",
        "--no-progress",
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == len(cases) and sorted(summary["cases"]) == cases
    assert list(summary["classes"]) == list(HIPPOCAMPUS_LABELS)
    for case in cases:
        truth_path = HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz"  # float32 for two cases
        for name, value in HIPPOCAMPUS_LABELS.items():
            scores = summary["cases"][case][name]
            expected = (stored(truth_path) == value).sum() * voxel_ml(truth_path)
            assert scores["true_volume_ml"] == pytest.approx(expected), (case, name)
            assert 0.0 <= scores["dice"] <= 1.0


# --------------------------------------------------------------------------- TotalSegmentator: many classes


def perturbed_copy(segmentation: Path, folder: Path, erode: int, delete: int) -> np.ndarray:
    """Write ``segmentation`` with class ``erode`` eroded by one voxel and class ``delete`` removed, as a real
    file with the original header, into ``folder``; returns the labels written (file axis order)."""
    original = nib.load(segmentation)
    truth = stored(segmentation)
    changed = truth.copy()
    kept = ndimage.binary_erosion(truth == erode)
    changed[(truth == erode) & ~kept] = 0
    changed[truth == delete] = 0
    folder.mkdir()
    path = folder / "case.nii.gz"
    nib.save(nib.Nifti1Image(changed, original.affine, original.header), path)
    return changed


@pytest.mark.parametrize("pair", [CT, MR], ids=["ct_41_classes", "mr_23_classes"])
def test_evaluate_many_classes_against_a_perturbed_copy(pair, tmp_path: Path, run_cli):
    """Every class is scored: Dice 1 where untouched, the eroded class's Dice as computed from the voxels,
    0 for the deleted one; volumes are the voxel counts times 27 mm3 (3 mm voxels)."""
    _, segmentation, n_classes = pair
    values = foreground_values(TOTALSEG / segmentation)
    counts = {v: int((stored(TOTALSEG / segmentation) == v).sum()) for v in values}
    erode = max(counts, key=counts.get)
    delete = min((v for v in values if counts[v] > 50), key=counts.get)
    truth_folder = tmp_path / "truth"
    truth_folder.mkdir()
    (truth_folder / "case.nii.gz").write_bytes((TOTALSEG / segmentation).read_bytes())
    changed = perturbed_copy(TOTALSEG / segmentation, tmp_path / "pred", erode, delete)

    result = run_cli("evaluate", "-p", tmp_path / "pred", "-g", truth_folder, "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert [c["values"] for c in summary["classes"].values()] == [[v] for v in values]
    assert len(values) == n_classes
    scores = summary["cases"]["case"]
    voxel = voxel_ml(TOTALSEG / segmentation)
    eroded = int((changed == erode).sum())
    for value in values:
        score = scores[str(value)]
        assert score["true_volume_ml"] == pytest.approx(counts[value] * voxel), value
        if value == erode:
            assert 0 < eroded < counts[value]
            assert score["dice"] == pytest.approx(2 * eroded / (eroded + counts[value]))
            assert score["pred_volume_ml"] == pytest.approx(eroded * voxel)
        elif value == delete:
            assert score["dice"] == 0.0 and score["pred_volume_ml"] == 0.0
        else:
            assert score["dice"] == 1.0 and score["hd95_mm"] == 0.0, value


def write_ct_or_mr_series(image: Path, folder: Path, modality: str) -> None:
    """Write a real NIfTI volume as a DICOM series with pydicom, slice k at origin + k * gap along the third
    axis, rows and columns along the second and first: the same grid in the LPS world."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    data, geometry = read_channels([image])
    direction = np.reshape(geometry.direction, (3, 3))
    storage = CTImageStorage if modality == "CT" else MRImageStorage
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir()
    for k, plane in enumerate(data[0]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = storage, generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = storage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Real^Example", "TS1", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, modality
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.InstanceNumber = k + 1
        position = np.asarray(geometry.origin) + k * geometry.spacing[0] * direction[:, 2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [geometry.spacing[1], geometry.spacing[2]]
        ds.SliceThickness = geometry.spacing[0]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)


@pytest.mark.parametrize("pair", [CT, MR], ids=["ct_41_segments", "mr_23_segments"])
def test_dicom_seg_with_every_class_round_trips_and_is_valid(pair, tmp_path: Path):
    """The real scan as a DICOM series reads back on the NIfTI's grid; its segmentation as a DICOM-SEG with one
    segment per class places every segment's voxels exactly and passes dciodvfy."""
    import highdicom as hd
    from test_dicom_seg import assert_valid, rebuild_on_grid

    from autoseg.data.io.dicom_seg import Segment, write_dicom_seg

    image, segmentation, n_classes = pair
    series = tmp_path / "series"
    write_ct_or_mr_series(TOTALSEG / image, series, "CT" if image.startswith("example_ct") else "MR")
    expected, nifti_geometry = read_channels([TOTALSEG / image])
    data, geometry = read_channels([series])
    assert nifti_geometry.mismatches(geometry) == []
    np.testing.assert_array_equal(data, expected)

    labels, _ = read_label(TOTALSEG / segmentation)
    values = foreground_values(TOTALSEG / segmentation)
    segments = [Segment(f"TotalSegmentator class {v}", (v,)) for v in values]
    out = tmp_path / "seg.dcm"
    write_dicom_seg(labels, series, segments, out, algorithm_name="TotalSegmentator reference")

    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.name for s in segments]
    assert len(segments) == n_classes
    rebuilt = rebuild_on_grid(seg, series, len(segments))
    for number, value in enumerate(values):
        np.testing.assert_array_equal(rebuilt[..., number], labels == value, err_msg=f"segment of class {value}")
    assert_valid(out)


def write_ct_dataset(root: Path) -> dict[str, int]:
    """TotalSegmentator's CT as an nnU-Net v2 dataset of three cases (the scan, its left-right mirror, its
    first 24 slices), labels rewritten as consecutive values; returns class name -> value."""
    image, segmentation = nib.load(TOTALSEG / CT[0]), nib.load(TOTALSEG / CT[1])
    values = foreground_values(TOTALSEG / CT[1])
    lookup = np.zeros(max(values) + 1, np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    labels = lookup[stored(TOTALSEG / CT[1])]
    scan = stored(TOTALSEG / CT[0])
    cases = {
        "ct_001": (scan, labels, image.affine),
        "ct_002": (scan[::-1], labels[::-1], image.affine),
        "ct_003": (scan[:, :, :24], labels[:, :, :24], image.affine),
    }
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, (voxels, mask, affine) in cases.items():
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(voxels), affine, image.header),
            root / "imagesTr" / f"{case}_0000.nii.gz",
        )
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(mask), affine, segmentation.header),
            root / "labelsTr" / f"{case}.nii.gz",
        )
    names = {f"class {v}": i + 1 for i, v in enumerate(values)}
    manifest = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0} | names,
        "numTraining": 3,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    return names


def test_quality_control_with_41_classes_on_real_ct(tmp_path: Path):
    """The QC reference of a real 41-class CT dataset, as `autoseg plan` fingerprints it: a training case
    raises no flag and reports every structure's volume; a class predicted empty is named; the real MR
    is not taken for this CT."""
    from autoseg.data.io.datasets import discover_dataset
    from autoseg.data.preprocessing.fingerprint import body_quantiles, compute_fingerprint
    from autoseg.data.qc.flags import assess_case, structure_volumes, training_reference

    names = write_ct_dataset(tmp_path / "Dataset901_TotalSeg")
    fingerprint = compute_fingerprint(discover_dataset(tmp_path / "Dataset901_TotalSeg"), show_progress=False)
    structures = {name: (value, (value,)) for name, value in names.items()}
    reference = training_reference(fingerprint, structures)
    assert len(reference.structures) == CT[2] == len(names)

    def assess(image: Path, labels: np.ndarray) -> dict:
        data, geometry = read_channels([image])
        volumes = structure_volumes(labels, structures, float(np.prod(geometry.spacing)) / 1000)
        return assess_case(geometry, body_quantiles(data, image.name), ["CT"], volumes, None, reference)

    case = tmp_path / "Dataset901_TotalSeg" / "imagesTr" / "ct_001_0000.nii.gz"
    labels, _ = read_label(tmp_path / "Dataset901_TotalSeg" / "labelsTr" / "ct_001.nii.gz")
    entry = assess(case, labels)
    assert entry["flags"] == []
    assert {n: v["volume_ml"] for n, v in entry["volumes"].items()} == pytest.approx(
        {n: (labels == v).sum() * voxel_ml(case) for n, v in names.items()}
    )
    everywhere = [n for n, s in reference.structures.items() if s.present == s.cases]
    assert everywhere and len(everywhere) < len(names)  # the 24-slice case lacks some classes
    missing = everywhere[0]
    entry = assess(case, np.where(labels == names[missing], 0, labels))
    assert [f["flag"] for f in entry["flags"]] == ["empty_structure"]
    assert entry["flags"][0]["reason"].startswith(f"{missing} predicted empty")

    mr_labels, _ = read_label(TOTALSEG / MR[1])
    flagged = {f["flag"] for f in assess(TOTALSEG / MR[0], np.zeros_like(mr_labels))["flags"]}
    assert flagged & {"intensity_range", "intensity_profile"}, flagged


@pytest.mark.slow
def test_predict_reports_every_structure_of_a_41_class_ct_model(tmp_path: Path, run_cli):
    """A tiny 41-class model of the real CT predicts the real CT: the mask on the input's grid with labels
    the dataset declares, and report.json with every structure's volume beside its training range."""
    dataset = tmp_path / "Dataset901_TotalSeg"
    names = write_ct_dataset(dataset)
    work, out = tmp_path / "work", tmp_path / "masks"
    planned = run_cli("plan", "-d", dataset, "-w", work, "-c", "3d_fullres", "--no-progress")
    assert planned.exit_code == 0, planned.output
    trained = run_cli("train", "-w", work, "--fold", "all", "--epochs", "1", "--no-validate", *TINY_TRAINING)
    assert trained.exit_code == 0, trained.output
    predicted = run_cli(
        "predict", "-w", work, "-i", TOTALSEG / CT[0], "-o", out, "--folds", "all", "--device", "cpu", "--no-tta",
        "--no-progress",
    )  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    mask_path = out / "example_ct_sm.nii.gz"
    mask, image = nib.load(mask_path), nib.load(TOTALSEG / CT[0])
    assert mask.shape == image.shape
    np.testing.assert_array_equal(mask.affine, image.affine)
    assert set(np.unique(stored(mask_path)).tolist()) <= {0, *names.values()}
    entry = json.loads((out / "report.json").read_text())["cases"]["example_ct_sm"]
    assert list(entry["volumes"]) == list(names)
    labels = stored(mask_path)
    for name, value in names.items():
        volume = entry["volumes"][name]
        assert volume["volume_ml"] == pytest.approx((labels == value).sum() * voxel_ml(mask_path)), name
        assert volume["training_cases_with_it"] in {"2/3", "3/3"} and len(volume["training_ml"]) == 2
    assert {f["flag"] for f in entry["flags"]} <= FLAGS
