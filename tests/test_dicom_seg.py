"""DICOM-SEG output: exact round trips on several acquisition geometries, codes, and dciodvfy validation.

The ground truth is a labelling of physical (LPS) space. The mask handed to the writer is that
labelling sampled on the grid autoseg reads from the series; the SEG read back is checked
against the same labelling sampled at each source file's own pixel positions, and rebuilt on
the grid through the SEG's own affine. Neither check trusts file or slice order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd  # the test extra installs it: pip install -e '.[test]'
import numpy as np
import pydicom  # comes with highdicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from autoseg.data.io.datasets import BRATS_LABELS, BRATS_REGIONS
from autoseg.data.io.dicom_seg import (
    GENERIC_CODES,
    Code,
    DicomSegError,
    Segment,
    SegmentCodes,
    codes_for,
    parse_code_overrides,
    segments_for,
    write_dicom_seg,
)
from autoseg.data.io.images import read_channels, read_geometry, read_label
from autoseg.phantoms import synthetic

SHAPE = (9, 12, 14)  # (z, y, x): slices, rows, columns
SPACING = (2.0, 1.5, 1.25)  # slice gap, row spacing (y), column spacing (x): all different
LABEL_SEGMENTS = [Segment("edema", (1,)), Segment("non-enhancing tumor core", (2,)), Segment("enhancing tumor", (3,))]


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


#: (row direction, column direction) in LPS for each acquisition.
ORIENTATIONS = {
    "axial": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),
    "sagittal": (np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),
    "coronal": (np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),
    "oblique": tuple(
        _rotation(np.array([1.0, 2.0, 0.5]), 23.0) @ v for v in (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    ),
}


def write_source_series(folder: Path, orientation: str, reverse: bool = False, origin=(-10.3, 7.1, 22.4)) -> dict:
    """Write an MR series with pydicom; slice k at origin + k * gap * stack direction.

    ``reverse`` stacks the slices against the normal (positions decrease along row x column)
    and numbers the files and instances in the opposite order, so neither file order nor
    instance number follows the array.
    """
    row, col = ORIENTATIONS[orientation]
    normal = np.cross(row, col)
    stack = -normal if reverse else normal
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = SHAPE[0]
    for k in range(n):
        position = np.asarray(origin) + k * SPACING[0] * stack
        number = n - k if reverse else k + 1
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality, ds.SeriesDescription = series, 7, "MR", "AX FLAIR"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = SPACING[0]
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = rng.integers(0, 1000, SHAPE[1:], dtype=np.int16).tobytes()
        ds.save_as(folder / f"im{(n - k if reverse else k):03d}.dcm", enforce_file_format=True)
    return {"study": study, "series": series, "frame": frame}


def truth(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """An asymmetric labelling of LPS space around ``centre``: any flip, swap or shift of slices changes it."""
    labels = np.zeros(points.shape[:-1], np.uint8)
    for value, offset, radius in ((1, (3.0, -2.0, 1.5), 5.1), (2, (-3.5, 2.5, -1.0), 3.3), (3, (1.0, 3.5, -3.2), 2.4)):
        labels[np.linalg.norm(points - centre - np.asarray(offset), axis=-1) < radius] = value
    return labels


def grid_points(folder: Path) -> np.ndarray:
    """LPS position of every voxel of the grid autoseg reads, shape (z, y, x, 3)."""
    g = read_geometry(folder)
    d = np.asarray(g.direction).reshape(3, 3)
    k, j, i = np.meshgrid(*(np.arange(s) for s in g.shape), indexing="ij")
    steps = np.stack([i * g.spacing[2], j * g.spacing[1], k * g.spacing[0]], axis=-1)
    return np.asarray(g.origin) + steps @ d.T


def file_points(ds) -> np.ndarray:
    """LPS position of every pixel of one source file, shape (rows, columns, 3), from its own header."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    dr, dc = float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])
    return ipp + (c * dc)[..., None] * iop[:3] + (r * dr)[..., None] * iop[3:]


def rebuild_on_grid(seg, folder: Path, n_segments: int) -> np.ndarray:
    """Per-segment masks (z, y, x, S) placed on the source grid through the SEG volume's affine."""
    g = read_geometry(folder)
    out = np.zeros((*g.shape, n_segments), np.uint8)
    volume = seg.get_volume(segment_numbers=list(range(1, n_segments + 1)))
    idx = np.stack(np.meshgrid(*(np.arange(s) for s in volume.array.shape[:3]), indexing="ij"), axis=-1)
    points = idx @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    d = np.asarray(g.direction).reshape(3, 3)
    continuous = ((points - np.asarray(g.origin)) @ d) / np.asarray(g.spacing[::-1])  # (x, y, z) indices
    grid_index = np.rint(continuous).astype(int)
    assert np.abs(continuous - grid_index).max() < 1e-3, "SEG voxels are not on the source grid"
    x, y, z = np.moveaxis(grid_index, -1, 0)
    out[z, y, x] = volume.array
    return out


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for ``path``; skip (or fail on CI) without it."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("dciodvfy is missing on CI: .ci/run must install dicom3tools")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools); DICOM-SEG not validated")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def assert_valid(path: Path) -> None:
    errors, warnings = dciodvfy_findings(path)
    assert not errors, "\n".join(errors)
    for line in sorted(set(warnings)):
        print("dciodvfy:", line)


@pytest.mark.parametrize(
    "orientation,reverse",
    [
        ("axial", False),
        ("axial", True),
        ("sagittal", False),
        ("coronal", False),
        ("coronal", True),
        ("oblique", False),
        ("oblique", True),
    ],
)
def test_round_trip_is_exact_and_valid(tmp_path: Path, orientation: str, reverse: bool) -> None:
    folder = tmp_path / "series"
    uids = write_source_series(folder, orientation, reverse)
    points = grid_points(folder)
    centre = points.reshape(-1, 3).mean(0)
    labels = truth(points, centre)
    assert {1, 2, 3} <= set(np.unique(labels).tolist()), "the test labelling must reach every label"
    out = tmp_path / "seg.dcm"

    write_dicom_seg(
        labels, folder, LABEL_SEGMENTS, out, algorithm_name="Dataset001 3d_fullres", algorithm_version="0.1.0"
    )

    seg = hd.seg.segread(out)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in folder.iterdir())}
    assert seg.StudyInstanceUID == uids["study"] and seg.FrameOfReferenceUID == uids["frame"]
    assert (seg.PatientID, str(seg.PatientName)) == ("P001", "Test^Patient")
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == uids["series"]
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)
    # per source file: the SEG frames that reference it hold the truth at that file's pixels
    uid_list = list(sources)
    by_source = seg.get_pixels_by_source_instance(
        uid_list, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True
    )
    for uid, frames in zip(uid_list, by_source):
        expected = truth(file_points(sources[uid]), centre)
        for number in (1, 2, 3):
            np.testing.assert_array_equal(frames[..., number - 1], expected == number, err_msg=f"{uid} #{number}")
    # on the source grid: the SEG volume, placed by its affine, equals the input voxel for voxel
    rebuilt = rebuild_on_grid(seg, folder, 3)
    np.testing.assert_array_equal((rebuilt * np.array([1, 2, 3])).sum(-1), labels)
    assert_valid(out)


def test_simpleitk_written_series_round_trips(tmp_path: Path) -> None:
    """autoseg's own synthetic DICOM writer (SimpleITK, sparse headers) is accepted and round-trips."""
    folder = tmp_path / "series"
    synthetic.write_dicom_series(np.zeros(SHAPE), SPACING, folder, origin=(-10.3, 7.1, 22.4))
    points = grid_points(folder)
    centre = points.reshape(-1, 3).mean(0)
    labels = truth(points, centre)
    out = tmp_path / "seg.dcm"
    write_dicom_seg(labels, folder, LABEL_SEGMENTS, out, algorithm_name="m")
    rebuilt = rebuild_on_grid(hd.seg.segread(out), folder, 3)
    np.testing.assert_array_equal((rebuilt * np.array([1, 2, 3])).sum(-1), labels)
    assert_valid(out)


def test_regions_overlap_and_carry_brain_tumour_codes(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_source_series(folder, "axial")
    points = grid_points(folder)
    centre = points.reshape(-1, 3).mean(0)
    labels = truth(points, centre)
    segments = segments_for(BRATS_LABELS, BRATS_REGIONS)
    assert [s.values for s in segments] == [(1, 2, 3), (2, 3), (3,)]
    out = tmp_path / "seg.dcm"
    write_dicom_seg(labels, folder, segments, out, algorithm_name="brats 3d_fullres")

    seg = hd.seg.segread(out)
    rebuilt = rebuild_on_grid(seg, folder, 3)
    for number, segment in enumerate(segments):
        np.testing.assert_array_equal(rebuilt[..., number], np.isin(labels, segment.values))
    described = [
        (
            s.SegmentLabel,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
        )
        for s in seg.SegmentSequence
    ]
    assert described == [
        ("whole tumor", "52988006", "49755003"),
        ("tumor core", "108369006", "49755003"),
        ("enhancing tumor", "C113842", "49755003"),
    ]
    item = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (item.AlgorithmName, item.AlgorithmVersion) == ("brats 3d_fullres", "0.1.0")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert_valid(out)


def test_segments_use_written_label_values() -> None:
    """BraTS masks are written with raw values (enhancing tumour 4): segments must follow them."""
    segments = segments_for(BRATS_LABELS, BRATS_REGIONS, output_values={"0": 0, "1": 2, "2": 1, "3": 4})
    assert [s.values for s in segments] == [(1, 2, 4), (1, 4), (4,)]
    labels = segments_for({"background": 0, "liver": 1, "ignore": 2, "lesion": 3})
    assert labels == [Segment("liver", (1,)), Segment("lesion", (3,))]


def test_empty_segments_are_described_and_all_empty_mask_is_valid(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_source_series(folder, "sagittal")
    labels = np.zeros(SHAPE, np.uint8)
    labels[4, 2:5, 3:9] = 1  # edema on one slice; the other two segments are empty
    out = tmp_path / "seg.dcm"
    write_dicom_seg(labels, folder, LABEL_SEGMENTS, out, algorithm_name="m")
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.name for s in LABEL_SEGMENTS]
    assert seg.NumberOfFrames == 1  # empty frames are left out
    np.testing.assert_array_equal(rebuild_on_grid(seg, folder, 3)[..., 0], labels == 1)
    assert_valid(out)

    empty = tmp_path / "empty.dcm"
    write_dicom_seg(np.zeros(SHAPE, np.uint8), folder, LABEL_SEGMENTS, empty, algorithm_name="m")
    seg = hd.seg.segread(empty)
    assert seg.NumberOfFrames >= 1 and not rebuild_on_grid(seg, folder, 3).any()
    assert_valid(empty)


def test_codes_known_generic_and_overridden() -> None:
    assert codes_for("Oedema").type == Code("79654002", "SCT", "Edema")
    assert codes_for("necrotic tumor core").type.value == "6574001"
    assert codes_for("NCR/NET").type.value == "C81175"
    assert codes_for("Whole Tumour").type.value == "52988006"
    assert codes_for("liver") == GENERIC_CODES
    liver = {
        "category": {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"},
        "type": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Liver"},
    }
    overrides = parse_code_overrides({"liver": liver, "edema": liver})
    assert codes_for("liver", overrides) == SegmentCodes(
        Code("91723000", "SCT", "Anatomical Structure"), Code("10200004", "SCT", "Liver")
    )
    assert codes_for("edema", overrides).type.meaning == "Liver"  # overrides win over the built-in table


@pytest.mark.parametrize(
    "raw,message",
    [
        ([], "must be an object"),
        ({"liver": {"type": {}}}, "exactly the keys 'category' and 'type'"),
        ({"liver": {"category": {"CodeValue": "1"}, "type": {}}}, "CodeValue, CodingSchemeDesignator, CodeMeaning"),
        (
            {"liver": {"category": {"CodeValue": "", "CodingSchemeDesignator": "SCT", "CodeMeaning": "x"}, "type": {}}},
            "non-empty strings",
        ),
    ],
)
def test_bad_code_overrides_are_refused_by_name(raw, message: str) -> None:
    with pytest.raises(DicomSegError, match=message):
        parse_code_overrides(raw)


def test_override_is_written(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_source_series(folder, "axial")
    points = grid_points(folder)
    centre = points.reshape(-1, 3).mean(0)
    labels = truth(points, centre)
    overrides = parse_code_overrides(
        {
            "edema": {
                "category": {
                    "CodeValue": "49755003",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Morphologically Abnormal Structure",
                },
                "type": {
                    "CodeValue": "C121674",
                    "CodingSchemeDesignator": "NCIt",
                    "CodeMeaning": "Peritumoral Brain Edema",
                },
            }
        }
    )
    out = tmp_path / "seg.dcm"
    write_dicom_seg(labels, folder, LABEL_SEGMENTS, out, algorithm_name="m", code_overrides=overrides)
    code = hd.seg.segread(out).SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("C121674", "NCIt")


def test_mask_off_the_grid_or_with_undescribed_values_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_source_series(folder, "axial")
    out = tmp_path / "seg.dcm"
    with pytest.raises(DicomSegError, match=r"shape \(9, 14, 12\).*\(9, 12, 14\)"):
        write_dicom_seg(np.zeros((9, 14, 12), np.uint8), folder, LABEL_SEGMENTS, out, algorithm_name="m")
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0] = 5
    with pytest.raises(DicomSegError, match=r"label values \[5\] that no segment describes"):
        write_dicom_seg(labels, folder, LABEL_SEGMENTS, out, algorithm_name="m")
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_slice_not_on_the_grid_is_refused(tmp_path: Path) -> None:
    """A file whose in-plane position disagrees with the grid must not be paired with a slice."""
    folder = tmp_path / "series"
    write_source_series(folder, "axial")
    path = sorted(folder.iterdir())[4]
    ds = pydicom.dcmread(path)
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0] + 0.6, ipp[1], ipp[2]]  # half a column off
    ds.save_as(path)
    with pytest.raises(DicomSegError, match="shifted within their plane by up to 0.6 mm"):
        write_dicom_seg(np.zeros(SHAPE, np.uint8), folder, LABEL_SEGMENTS, tmp_path / "seg.dcm", algorithm_name="m")


def test_validator_check_catches_a_broken_seg(tmp_path: Path) -> None:
    """The dciodvfy check is live: a SEG missing a required attribute is reported as an error."""
    folder = tmp_path / "series"
    write_source_series(folder, "axial")
    out = tmp_path / "seg.dcm"
    write_dicom_seg(np.ones(SHAPE, np.uint8), folder, LABEL_SEGMENTS[:1], out, algorithm_name="m")
    ds = pydicom.dcmread(out)
    del ds.SegmentSequence[0].SegmentLabel
    ds.save_as(out)
    errors, _ = dciodvfy_findings(out)
    assert any("SegmentLabel" in line for line in errors), errors


def test_missing_highdicom_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    with pytest.raises(DicomSegError, match=r"pip install 'autoseg\[dicom\]'"):
        write_dicom_seg(np.zeros(SHAPE, np.uint8), tmp_path, LABEL_SEGMENTS, tmp_path / "seg.dcm", algorithm_name="m")


def test_series_without_frame_of_reference_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    write_source_series(folder, "axial")
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    with pytest.raises(DicomSegError, match="no FrameOfReferenceUID"):
        write_dicom_seg(np.zeros(SHAPE, np.uint8), folder, LABEL_SEGMENTS, tmp_path / "seg.dcm", algorithm_name="m")


# --------------------------------------------------------------------------- autoseg predict --output-type


@pytest.fixture(scope="module")
def dicom_model(tmp_path_factory) -> tuple[Path, Path]:
    """(work folder of a random-weight model planned on a DICOM dataset, that dataset)."""
    import torch

    from autoseg.commands.plan import plan_dataset
    from autoseg.core.checkpoint import save_checkpoint
    from autoseg.core.plan import load_plan
    from autoseg.model.network import build_network

    root = tmp_path_factory.mktemp("dicom_predict")
    dataset = synthetic.write_dicom_brain(root / "DicomBrain", 2, shape=(10, 16, 14))
    work = root / "work"
    plan_dataset(
        dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], preprocess=False, show_progress=False
    )
    plan = load_plan(work / "DicomBrain" / "plans.json")
    torch.manual_seed(0)
    network = build_network(plan.configuration("3d_fullres"), 2, plan.num_classes, deep_supervision=False)
    for parameter in network.heads[-1].parameters():  # bias the head so that every class appears somewhere
        torch.nn.init.normal_(parameter, std=2.0)
    save_checkpoint(
        work / "DicomBrain" / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt",
        {"weights": network.state_dict(), "epoch": 0},
    )
    return work, dataset


def test_predict_writes_a_valid_dicom_seg_equal_to_the_nifti_mask(dicom_model, tmp_path, run_cli) -> None:
    work, dataset = dicom_model
    series = dataset / "imagesTr" / "DCM_001_0000"
    out = tmp_path / "out"
    result = run_cli(
        "predict",
        "-w",
        work,
        "-i",
        series,
        "-o",
        out,
        "--output-type",
        "both",
        "--no-tta",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    nifti, _ = read_label(out / "DCM_001.nii.gz")
    assert len(np.unique(nifti)) > 1, "the test needs a mask with foreground"
    seg = hd.seg.segread(out / "DCM_001.dcm")
    assert_valid(out / "DCM_001.dcm")
    segments = segments_for(synthetic.BRAIN_LABELS, (), None)
    per_segment = rebuild_on_grid(seg, series, len(segments))
    for k, segment in enumerate(segments):
        np.testing.assert_array_equal(per_segment[..., k], np.isin(nifti, segment.values).astype(np.uint8))
    assert seg.SeriesInstanceUID != pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(
        pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    )

    again = run_cli(
        "predict", "-w", work, "-i", series, "-o", out, "--output-type", "both", "--device", "cpu", "--no-progress"
    )
    assert again.exit_code == 0 and "1 skipped" in again.output  # both outputs there: resumed, not redone


def test_dicom_seg_from_image_files_is_refused_before_any_case(dicom_model, tmp_path, run_cli) -> None:
    work, dataset = dicom_model
    nifti_input = tmp_path / "in"
    nifti_input.mkdir()
    image, geometry = read_channels([dataset / "imagesTr" / "DCM_001_0000", dataset / "imagesTr" / "DCM_001_0001"])
    from autoseg.data.io.images import write_array

    for c in range(2):
        write_array(image[c], geometry, nifti_input / f"CASE_{c:04d}.nii.gz")
    result = run_cli(
        "predict",
        "-w",
        work,
        "-i",
        nifti_input,
        "-o",
        tmp_path / "out",
        "--output-type",
        "dicom-seg",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 1 and "DICOM-SEG output needs DICOM series input" in result.output
    assert not (tmp_path / "out").exists()


def test_plan_checks_the_code_overrides_and_carries_them_to_predict(tmp_path: Path) -> None:
    import json

    from autoseg.commands.plan import plan_dataset

    dataset = synthetic.write_dicom_brain(tmp_path / "DicomBrain", 2, shape=(6, 8, 8))
    meta = json.loads((dataset / "dataset.json").read_text())
    code = {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"}
    meta["dicom_seg_codes"] = {"edema": {"category": code, "type": code}}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    plan_dataset(dataset_dir=dataset, workdir=tmp_path / "work", preprocess=False, show_progress=False)
    record = json.loads((tmp_path / "work" / "DicomBrain" / "dataset.json").read_text())
    assert record["dicom_seg_codes"] == meta["dicom_seg_codes"]
    meta["dicom_seg_codes"] = {"edema": {"category": code}}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DicomSegError, match="edema"):
        plan_dataset(dataset_dir=dataset, workdir=tmp_path / "work2", preprocess=False, show_progress=False)
    assert not (tmp_path / "work2").exists()  # refused before anything is written


def test_a_study_folder_of_series_is_one_case_with_channels_by_description(dicom_model, tmp_path, run_cli) -> None:
    """predict -i STUDY: each case a folder of series; channels found by SeriesDescription, not by folder order."""
    work, dataset = dicom_model
    channels = [dataset / "imagesTr" / f"DCM_001_000{c}" for c in range(2)]
    image, geometry = read_channels(channels)
    study = tmp_path / "study" / "PATIENT_7"
    # folder names sort the other way round from the model's channel order (FLAIR, T1w)
    for folder, channel, description in (("a_series", 1, "T1w SAG 3D"), ("b_series", 0, "AX FLAIR")):
        synthetic.write_dicom_series(
            image[channel],
            geometry.spacing,
            study / folder,
            description=description,
            series_uid=f"1.2.826.0.1.3680043.2.1125.9.{channel}",
        )
    direct, mapped = tmp_path / "direct", tmp_path / "mapped"
    for source, out in ((channels[0], direct), (study.parent, mapped)):
        result = run_cli("predict", "-w", work, "-i", source, "-o", out, "--no-tta", "--device", "cpu", "--no-progress")
        assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_label(mapped / "PATIENT_7.nii.gz")[0], read_label(direct / "DCM_001.nii.gz")[0])
