"""`autoseg plan` refuses every kind of bad input with one readable message and writes nothing.

Each test builds a tiny synthetic dataset, breaks one thing with real files, and checks
that the CLI (a) exits non-zero, (b) prints a message naming the case and the problem
without a traceback, and (c) leaves no dataset folder in the work folder.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.phantoms import synthetic

SHAPE = (16, 20, 18)
DICOM_SHAPE = (8, 16, 14)


# --------------------------------------------------------------------------- helpers


def plan(ds: Path, work: Path):
    return CliRunner().invoke(app, ["plan", "-d", str(ds), "-w", str(work), "-j", "1", "--no-progress"])


def expect_rejected(ds: Path, work: Path, *fragments: str) -> str:
    """Run `autoseg plan` and check it failed cleanly, naming every fragment; return the output."""
    result = plan(ds, work)
    output = result.output
    print(output)  # shown by pytest when a check fails (or with -s)
    assert result.exit_code != 0, output
    # typer's runner swallows uncaught exceptions: a clean failure is a SystemExit from typer.Exit
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{output}"
    assert result.exit_code == 1, output
    assert "Traceback" not in output, output
    assert output.strip().startswith("Error:"), output
    for fragment in fragments:
        assert fragment.lower() in output.lower(), f"{fragment!r} not in:\n{output}"
    assert not (work / ds.name).exists(), f"plan wrote {work / ds.name} for a bad dataset"
    return output


def read_xyz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels in NIfTI (x, y, z[, c]) order and the affine of a NIfTI file."""
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine.copy()


def save_xyz(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def rewrite(path: Path, edit=None, affine=None) -> None:
    """Rewrite a NIfTI file with its voxels passed through ``edit`` and/or a new affine."""
    data, old_affine = read_xyz(path)
    data = edit(data.copy()) if edit is not None else data
    save_xyz(data, old_affine if affine is None else affine, path)


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def nnunet(tmp_path: Path) -> Path:
    """nnU-Net v2 layout, cases BRATS_001..003, channels _0000.._0003."""
    return synthetic.write_nnunet_brain(tmp_path / "Dataset001_Brain", 3, shape=SHAPE)


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    """MSD layout, 4D images BRATS_001..003 with 4 channels."""
    return synthetic.write_msd_brain(tmp_path / "Task01_BrainTumour", 3, shape=SHAPE)


# --------------------------------------------------------------------------- positive control


def test_good_dataset_is_accepted(nnunet, work):
    result = plan(nnunet, work)
    assert result.exit_code == 0, result.output
    assert (work / nnunet.name / "plans.json").is_file()


# --------------------------------------------------------------------------- 1. missing files


def test_missing_channel_file(nnunet, work):
    (nnunet / "imagesTr" / "BRATS_002_0002.nii.gz").unlink()
    expect_rejected(nnunet, work, "case BRATS_002", "missing channel", "_0002")


def test_missing_label_file(nnunet, work):
    (nnunet / "labelsTr" / "BRATS_003.nii.gz").unlink()
    expect_rejected(nnunet, work, "case BRATS_003", "labelsTr/BRATS_003.nii.gz", "missing")


def test_msd_missing_label_file(msd, work):
    (msd / "labelsTr" / "BRATS_002.nii.gz").unlink()
    output = expect_rejected(msd, work, "case BRATS_002", "file labelsTr/BRATS_002.nii.gz is missing")
    assert "imagesTr/BRATS_002" not in output


# --------------------------------------------------------------------------- 2. image/label mismatch


def test_label_shape_mismatch(nnunet, work):
    label = nnunet / "labelsTr" / "BRATS_002.nii.gz"
    rewrite(label, edit=lambda d: d[:-1])  # one voxel less along x
    expect_rejected(nnunet, work, "case BRATS_002", "label does not match the image", "shape")


def test_label_spacing_mismatch(nnunet, work):
    label = nnunet / "labelsTr" / "BRATS_001.nii.gz"
    _, affine = read_xyz(label)
    affine[:3, 2] *= 1.5  # same shape, z spacing 1.5 mm
    rewrite(label, affine=affine)
    expect_rejected(nnunet, work, "case BRATS_001", "label does not match the image", "spacing")


def test_label_origin_mismatch(nnunet, work):
    label = nnunet / "labelsTr" / "BRATS_001.nii.gz"
    _, affine = read_xyz(label)
    affine[:3, 3] += 5.0
    rewrite(label, affine=affine)
    output = expect_rejected(nnunet, work, "case BRATS_001", "label does not match the image", "origin")
    assert "spacing" not in output


# --------------------------------------------------------------------------- 3. channels on different grids


def test_channels_on_different_grids(nnunet, work):
    channel = nnunet / "imagesTr" / "BRATS_003_0001.nii.gz"
    _, affine = read_xyz(channel)
    affine[:3, 3] += 2.0
    rewrite(channel, affine=affine)
    expect_rejected(nnunet, work, "case BRATS_003", "BRATS_003_0001.nii.gz is not on the grid", "origin")


def test_channels_with_different_shapes(nnunet, work):
    rewrite(nnunet / "imagesTr" / "BRATS_001_0003.nii.gz", edit=lambda d: d[:, :-2])
    expect_rejected(nnunet, work, "case BRATS_001", "BRATS_001_0003.nii.gz is not on the grid", "shape")


# --------------------------------------------------------------------------- 4. non-finite voxels


@pytest.mark.parametrize("value, name", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_voxels(nnunet, work, value, name):
    def poison(data):
        data[3, 4, 5] = value
        data[6, 7, 8] = value
        return data

    rewrite(nnunet / "imagesTr" / "BRATS_002_0001.nii.gz", edit=poison)
    expect_rejected(nnunet, work, "case BRATS_002", name, "2 NaN/Inf voxel(s) in channel(s) [1]")


def test_non_finite_voxels_in_4d_msd_image(msd, work):
    def poison(data):
        data[1, 2, 3, 2] = np.nan
        return data

    rewrite(msd / "imagesTr" / "BRATS_003.nii.gz", edit=poison)
    expect_rejected(msd, work, "case BRATS_003", "NaN", "channel(s) [2]")


# --------------------------------------------------------------------------- 5. undeclared labels


def test_undeclared_label_value(nnunet, work):
    def add_seven(data):
        data[0, 0, 0] = 7
        return data

    rewrite(nnunet / "labelsTr" / "BRATS_002.nii.gz", edit=add_seven)
    expect_rejected(nnunet, work, "case BRATS_002", "label values [7] are not declared")


def test_brats_label_5(tmp_path, work):
    ds = synthetic.write_brats(tmp_path / "BraTS2021", 2, shape=SHAPE)
    case = "BraTS2021_00001"

    def add_five(data):
        data[1, 1, 1] = 5
        return data

    rewrite(ds / case / f"{case}_seg.nii.gz", edit=add_five)
    expect_rejected(ds, work, f"case {case}", "label values [5] are not declared")


def test_non_integer_label(nnunet, work):
    def make_fractional(data):
        data = data.astype(np.float32)
        data[2, 2, 2] = 0.5
        return data

    rewrite(nnunet / "labelsTr" / "BRATS_001.nii.gz", edit=make_fractional)
    expect_rejected(nnunet, work, "case BRATS_001", "cannot read label", "non-integer")


# --------------------------------------------------------------------------- 6. unreadable files


def test_garbage_image_file(nnunet, work):
    (nnunet / "imagesTr" / "BRATS_001_0000.nii.gz").write_bytes(b"this is not a NIfTI file at all\x00\x01" * 20)
    expect_rejected(nnunet, work, "case BRATS_001", "cannot read image")


def test_garbage_label_file(nnunet, work):
    (nnunet / "labelsTr" / "BRATS_002.nii.gz").write_bytes(bytes(range(256)) * 4)
    expect_rejected(nnunet, work, "case BRATS_002", "cannot read label BRATS_002.nii.gz")


def test_truncated_image_file(nnunet, work):
    path = nnunet / "imagesTr" / "BRATS_003_0002.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    expect_rejected(nnunet, work, "case BRATS_003", "cannot read image: BRATS_003_0002.nii.gz: truncated file")


def test_truncated_uncompressed_channel_file(tmp_path, work):
    ds = synthetic.write_nnunet_brain(tmp_path / "Dataset001_Brain", 2, shape=SHAPE)
    for packed in ds.rglob("*.nii.gz"):
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()
    edit_json(ds / "dataset.json", lambda meta: meta.update(file_ending=".nii"))
    path = ds / "imagesTr" / "BRATS_002_0003.nii"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    expect_rejected(
        ds,
        work,
        "case BRATS_002",
        "cannot read image: BRATS_002_0003.nii: truncated file",
        f"declares shape {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]}",
    )


def test_truncated_label_file(msd, work):
    path = msd / "labelsTr" / "BRATS_001.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    expect_rejected(msd, work, "case BRATS_001", "cannot read label BRATS_001.nii.gz")


# --------------------------------------------------------------------------- 7. case files outside the dataset
# One rule for dataset.json paths and symlinks: both may lead outside the dataset folder (a shared data
# store); a listed file that does not exist is refused by its path. See docs/datasets.md.


def test_msd_training_path_outside_the_dataset_is_read(msd, work):
    outside = msd.parent / "outside"
    outside.mkdir()
    shutil.move(msd / "imagesTr" / "BRATS_002.nii.gz", outside / "x.nii.gz")

    def elsewhere(meta):
        meta["training"][1]["image"] = "../outside/x.nii.gz"

    edit_json(msd / "dataset.json", elsewhere)
    result = plan(msd, work)
    assert result.exit_code == 0, result.output
    record = json.loads((work / msd.name / "dataset.json").read_text())
    assert record["cases"]["x"]["images"] == [str(outside / "x.nii.gz")]


def test_nnunet_explicit_dataset_entry_outside_the_dataset_must_exist(nnunet, work):
    def explicit(meta):
        meta["dataset"] = {
            f"BRATS_00{i}": {
                "images": [f"imagesTr/BRATS_00{i}_{c:04d}.nii.gz" for c in range(4)],
                "label": f"labelsTr/BRATS_00{i}.nii.gz",
            }
            for i in (1, 2, 3)
        }
        meta["dataset"]["BRATS_002"]["label"] = "../outside/y.nii.gz"

    edit_json(nnunet / "dataset.json", explicit)
    expect_rejected(nnunet, work, "case BRATS_002", f"file {nnunet.parent / 'outside' / 'y.nii.gz'} is missing")


# --------------------------------------------------------------------------- 8. empty / missing dataset


def test_dataset_json_without_cases(nnunet, work):
    for folder in ("imagesTr", "labelsTr"):
        for path in (nnunet / folder).iterdir():
            path.unlink()
    expect_rejected(nnunet, work, "no training cases found", str(nnunet.name))


def test_empty_folder(tmp_path, work):
    ds = tmp_path / "Empty"
    ds.mkdir()
    expect_rejected(ds, work, "Empty has no dataset.json and no BraTS case folders")


def test_nonexistent_folder(tmp_path, work):
    expect_rejected(tmp_path / "NoSuchDataset", work, "NoSuchDataset does not exist")


# --------------------------------------------------------------------------- 9. channel count


def test_msd_image_with_too_few_channels(msd, work):
    rewrite(msd / "imagesTr" / "BRATS_002.nii.gz", edit=lambda d: d[..., :3])
    expect_rejected(msd, work, "case BRATS_002", "image has 3 channel(s), dataset.json declares 4")


# --------------------------------------------------------------------------- 10. DICOM series


@pytest.fixture
def dicom(tmp_path: Path) -> Path:
    """nnU-Net layout with DICOM series folders DCM_001_0000 ... and NIfTI labels."""
    return synthetic.write_dicom_brain(tmp_path / "DicomBrain", 2, shape=DICOM_SHAPE)


def test_dicom_uneven_slice_spacing(dicom, work):
    folder = dicom / "imagesTr" / "DCM_002_0001"
    shutil.rmtree(folder)
    volume = np.random.default_rng(0).integers(0, 500, size=DICOM_SHAPE).astype(np.int16)
    positions = [2.0 * k for k in range(DICOM_SHAPE[0])]
    positions[5:] = [p + 2.0 for p in positions[5:]]  # one gap doubled: a missing slice
    synthetic.write_dicom_series(
        volume, (2.0, 1.0, 1.0), folder, series_uid="1.2.826.0.1.3680043.2.1125.77", positions_z=positions
    )
    expect_rejected(dicom, work, "case DCM_002", "uneven slice spacing")


def test_dicom_mixed_orientations(dicom, work):
    import SimpleITK as sitk

    slice_file = dicom / "imagesTr" / "DCM_001_0000" / "slice_0003.dcm"
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(slice_file))
    image = reader.Execute()
    image.SetMetaData("0020|0037", "1\\0\\0\\0\\0.9\\0.4358898943540674")  # tilted column direction
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(slice_file))
    writer.Execute(image)
    expect_rejected(dicom, work, "case DCM_001", "orientation")


# --------------------------------------------------------------------------- 11. dataset.json problems


def test_missing_file_ending(nnunet, work):
    edit_json(nnunet / "dataset.json", lambda meta: meta.pop("file_ending"))
    expect_rejected(nnunet, work, "dataset.json", "'file_ending' is required")


def test_non_consecutive_labels(nnunet, work):
    def gap(meta):
        meta["labels"] = {"background": 0, "edema": 1, "non-enhancing tumour": 2, "enhancing tumour": 4}

    edit_json(nnunet / "dataset.json", gap)
    expect_rejected(nnunet, work, "dataset.json", "consecutive", "[0, 1, 2, 4]")


def test_msd_non_consecutive_labels(msd, work):
    def gap(meta):
        meta["labels"] = {"0": "background", "1": "edema", "3": "enhancing tumour"}

    edit_json(msd / "dataset.json", gap)
    expect_rejected(msd, work, "dataset.json", "consecutive", "[0, 1, 3]")


def test_num_training_does_not_match(nnunet, work):
    edit_json(nnunet / "dataset.json", lambda meta: meta.update(numTraining=5))
    expect_rejected(nnunet, work, "numTraining is 5 but 3 cases were found")


@pytest.mark.parametrize(
    "layout, change, fragments",
    [
        (
            "nnunet",
            lambda m: m.update(channel_names={"zero": "FLAIR"}),
            ["dataset.json: 'channel_names' keys must be '0', '1'"],
        ),
        ("msd", lambda m: m.update(modality={"a": "FLAIR"}), ["dataset.json: 'modality' keys must be '0', '1'"]),
        ("msd", lambda m: m["training"][0].update(image=None), ["dataset.json: training entry 0 needs file paths"]),
        ("msd", lambda m: m.update(training={"a": 1}), ["dataset.json: 'training' must be a list"]),
        ("msd", lambda m: m.update(labels={}), ["dataset.json: MSD 'labels' must map"]),
        (
            "nnunet",
            lambda m: m.update(dataset={"A": ["imagesTr/BRATS_001_0000.nii.gz"]}),
            ["case A: dataset.json entry must be"],
        ),
        (
            "nnunet",
            lambda m: m.update(
                dataset={"A": {"images": "imagesTr/BRATS_001_0000.nii.gz", "label": "labelsTr/BRATS_001.nii.gz"}}
            ),
            ["case A: dataset.json entry must be"],
        ),
        (
            "nnunet",
            lambda m: m.update(labels={"background": 0, "edema": True}),
            ["dataset.json: label 'edema' has value True"],
        ),
    ],
)
def test_malformed_dataset_json(nnunet, msd, work, layout, change, fragments):
    ds = nnunet if layout == "nnunet" else msd
    edit_json(ds / "dataset.json", change)
    expect_rejected(ds, work, *fragments)


# --------------------------------------------------------------------------- every problem at once


def test_all_problems_in_different_cases_reported_together(tmp_path, work):
    ds = synthetic.write_nnunet_brain(tmp_path / "Dataset002_Many", 5, shape=SHAPE)

    def nan(data):
        data[1, 1, 1] = np.nan
        return data

    def seven(data):
        data[0, 0, 0] = 7
        return data

    rewrite(ds / "imagesTr" / "BRATS_001_0000.nii.gz", edit=nan)
    rewrite(ds / "labelsTr" / "BRATS_002.nii.gz", edit=seven)
    rewrite(ds / "labelsTr" / "BRATS_003.nii.gz", edit=lambda d: d[:, :-1])
    (ds / "imagesTr" / "BRATS_004_0001.nii.gz").write_bytes(b"garbage" * 50)
    output = expect_rejected(
        ds,
        work,
        "dataset Dataset002_Many has problems (4):",
        "case BRATS_001: image has 1 NaN/Inf voxel(s)",
        "case BRATS_002: label values [7] are not declared",
        "case BRATS_003: label does not match the image: shape",
        "case BRATS_004: cannot read image",
    )
    assert "BRATS_005" not in output


def test_all_discovery_problems_reported_together(nnunet, work):
    (nnunet / "imagesTr" / "BRATS_001_0003.nii.gz").unlink()
    (nnunet / "labelsTr" / "BRATS_002.nii.gz").unlink()
    (nnunet / "imagesTr" / "BRATS_003_0000.nii.gz").rename(nnunet / "imagesTr" / "BRATS_003_00.nii.gz")
    expect_rejected(
        nnunet,
        work,
        "case BRATS_001: missing channel file(s) _0003",
        "case BRATS_002: label file labelsTr/BRATS_002.nii.gz is missing",
        "imagesTr/BRATS_003_00.nii.gz: name is not CASE_XXXX.nii.gz",
        "case BRATS_003: missing channel file(s) _0000",
    )


def test_discovery_and_voxel_problems_reported_together(nnunet, work):
    (nnunet / "labelsTr" / "BRATS_001.nii.gz").unlink()

    def nan(data):
        data[1, 1, 1] = np.nan
        return data

    rewrite(nnunet / "imagesTr" / "BRATS_002_0000.nii.gz", edit=nan)
    expect_rejected(nnunet, work, "case BRATS_001: label file", "case BRATS_002: image has 1 NaN/Inf voxel(s)")
