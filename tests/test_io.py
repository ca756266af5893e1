"""Geometry is sacred: reading and writing keep shape, affine, header codes, spacing, origin, direction."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.core.errors import DatasetError
from autoseg.data.io.images import read_channels, read_geometry, read_label, write_array, write_label
from autoseg.phantoms.synthetic import random_affine, write_dicom_series


def _nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray, qcode=1, scode=2) -> Path:
    image = nib.Nifti1Image(data_xyz, affine)
    image.header.set_qform(affine, code=qcode)
    image.header.set_sform(affine, code=scode)
    nib.save(image, str(path))
    return path


def test_nifti_axis_order_and_spacing(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # x, y, z
    affine = np.diag([0.5, 0.8, 3.0, 1.0])
    array, geometry = read_channels([_nifti(tmp_path / "a.nii.gz", data, affine)])
    assert array.shape == (1, 7, 6, 5)
    assert geometry.spacing == pytest.approx((3.0, 0.8, 0.5))
    assert array[0, 2, 1, 0] == data[0, 1, 2]


def test_4d_nifti_becomes_channels(tmp_path):
    data = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    array, _ = read_channels([_nifti(tmp_path / "a.nii.gz", data, np.eye(4))])
    assert array.shape == (3, 7, 6, 5)
    np.testing.assert_array_equal(array[2], data[..., 2].transpose(2, 1, 0))


def test_label_round_trip_keeps_oblique_affine_and_header_codes(tmp_path):
    rng = np.random.default_rng(1)
    affine = random_affine((2.5, 0.9, 0.7), rng)
    source = _nifti(tmp_path / "img.nii.gz", rng.random((9, 8, 7)).astype(np.float32), affine, qcode=1, scode=4)
    _, geometry = read_channels([source])
    label = rng.integers(0, 4, size=geometry.shape).astype(np.int16)
    write_label(label, geometry, tmp_path / "pred.nii.gz")
    written, original = nib.load(tmp_path / "pred.nii.gz"), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
    np.testing.assert_allclose(written.header.get_qform(), original.header.get_qform(), atol=1e-6)
    assert written.get_data_dtype() == np.uint8
    back, back_geometry = read_label(tmp_path / "pred.nii.gz")
    np.testing.assert_array_equal(back, label)
    assert back_geometry.mismatches(geometry) == []


def test_label_with_scaled_source_header_is_not_rescaled(tmp_path):
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, 10.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    _, geometry = read_channels([tmp_path / "scaled.nii.gz"])
    write_label(np.full(geometry.shape, 3, np.int16), geometry, tmp_path / "out.nii.gz")
    assert np.unique(nib.load(tmp_path / "out.nii.gz").get_fdata()).tolist() == [3.0]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_itk_formats_round_trip(tmp_path, suffix):
    image = sitk.GetImageFromArray(np.random.default_rng(2).random((6, 7, 8)).astype(np.float32))
    image.SetSpacing((0.7, 0.8, 2.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    direction = sitk.VersorRigid3DTransform((0.1, 0.2, 0.05, 0.97)).GetMatrix()
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / f"in{suffix}"))
    array, geometry = read_channels([tmp_path / f"in{suffix}"])
    assert geometry.spacing == pytest.approx((2.0, 0.8, 0.7), rel=1e-5)
    write_label((array[0] > 0.5).astype(np.uint8), geometry, tmp_path / f"out{suffix}")
    out = sitk.ReadImage(str(tmp_path / f"out{suffix}"))
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-5)


def test_dicom_series_reads_with_geometry(tmp_path):
    volume = np.random.default_rng(3).integers(0, 1000, size=(6, 10, 12)).astype(np.int16)
    write_dicom_series(volume, (3.0, 0.9, 0.8), tmp_path / "series", origin=(1.0, 2.0, 3.0))
    array, geometry = read_channels([tmp_path / "series"])
    assert array.shape == (1, 6, 10, 12)
    np.testing.assert_array_equal(array[0], volume)
    assert geometry.spacing == pytest.approx((3.0, 0.9, 0.8))
    assert geometry.origin == pytest.approx((1.0, 2.0, 3.0))
    assert read_geometry(tmp_path / "series").shape == (6, 10, 12)


def test_dicom_uneven_spacing_is_an_error(tmp_path):
    volume = np.zeros((5, 8, 8), np.int16)
    write_dicom_series(volume, (2.0, 1.0, 1.0), tmp_path / "s", positions_z=[0, 2, 4, 8, 10])
    with pytest.raises(ValueError, match="uneven slice spacing"):
        read_channels([tmp_path / "s"])


def test_dicom_sheared_stack_is_an_error(tmp_path):
    """A slice shifted within its plane (gantry tilt) is no regular grid: refused, not read as one."""
    import pydicom

    volume = np.zeros((5, 8, 8), np.int16)
    write_dicom_series(volume, (2.0, 1.0, 1.0), tmp_path / "s")
    read_channels([tmp_path / "s"])  # the regular stack reads
    path = tmp_path / "s" / "slice_0002.dcm"
    dataset = pydicom.dcmread(path)
    dataset.ImagePositionPatient = [float(dataset.ImagePositionPatient[0]) + 1.5, *dataset.ImagePositionPatient[1:]]
    dataset.save_as(path)
    with pytest.raises(ValueError, match="shifted within their plane by up to 1.5 mm"):
        read_channels([tmp_path / "s"])


def test_write_refuses_wrong_shape(tmp_path):
    _, geometry = read_channels([_nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32), np.eye(4))])
    with pytest.raises(ValueError, match="does not match"):
        write_array(np.zeros((6, 5, 5), np.uint8), geometry, tmp_path / "b.nii.gz")


def test_unreadable_files_are_value_errors_naming_the_file(tmp_path):
    """Every caller reports (OSError, ValueError) per case: nibabel's and zlib's errors must arrive as one."""
    from autoseg.data.io.images import read_channels

    (tmp_path / "text.nii.gz").write_bytes(b"not an image")
    (tmp_path / "text.mha").write_bytes(b"not an image either")
    for name in ("text.nii.gz", "text.mha"):
        with pytest.raises(ValueError, match=name):
            read_channels([tmp_path / name])


def test_atomic_writes_get_the_umask_permissions_and_refuse_a_file_as_folder(tmp_path):
    import os

    from autoseg.core.errors import WorkspaceError
    from autoseg.core.files import atomic_write_bytes, write_json

    write_json(tmp_path / "a.json", {"version": 1})
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a.json", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(WorkspaceError, match="a.json is a file, not a folder"):
        write_json(tmp_path / "a.json" / "inner.json", {})


def test_brats_case_folders_follow_the_models_channel_order(tmp_path):
    """A BraTS folder fed to a model planned elsewhere: files are matched to its channels by name."""
    from autoseg.data.io.datasets import brats_channel_order
    from autoseg.inference.inputs import find_cases

    case = tmp_path / "BraTS-GLI-00001-000"
    case.mkdir()
    for suffix in ("t1n", "t1c", "t2w", "t2f"):  # BraTS 2023 names
        (case / f"{case.name}-{suffix}.nii.gz").write_bytes(b"")
    order = {
        None: ["t2f", "t1n", "t1c", "t2w"],  # FLAIR, T1, T1ce, T2 without names
        ("FLAIR", "T1w", "t1gd", "T2w"): ["t2f", "t1n", "t1c", "t2w"],  # MSD Task01
        ("T1", "T1ce", "T2", "FLAIR"): ["t1n", "t1c", "t2w", "t2f"],
    }  # an nnU-Net dataset's order
    for names, suffixes in order.items():
        (found,) = find_cases(tmp_path, names)
        assert [p.name.removesuffix(".nii.gz").rsplit("-", 1)[1] for p in found.images] == suffixes
    assert brats_channel_order(("CT",)) is None and brats_channel_order(("T1", "T1", "T2", "FLAIR")) is None


def test_label_with_a_singleton_fourth_axis_reads_as_3d(tmp_path):
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2:4, 1:3, 1:3] = 2
    nib.save(nib.Nifti1Image(labels[..., None], np.eye(4)), tmp_path / "one.nii.gz")
    data, _ = read_label(tmp_path / "one.nii.gz")
    np.testing.assert_array_equal(data, labels.transpose(2, 1, 0))
    nib.save(nib.Nifti1Image(np.stack([labels, labels], -1), np.eye(4)), tmp_path / "two.nii.gz")
    with pytest.raises(ValueError, match="two.nii.gz: a label map must be 3D, it has 2 volumes along a 4th axis"):
        read_label(tmp_path / "two.nii.gz")


def test_a_case_folder_given_by_itself_is_one_case(tmp_path):
    """A DICOM series folder (with its channel siblings) or a BraTS case folder, passed to predict -i alone."""
    from autoseg.inference.inputs import find_cases
    from autoseg.phantoms import synthetic

    dicom = synthetic.write_dicom_brain(tmp_path / "dcm", 2, shape=(6, 8, 8)) / "imagesTr"
    (case,) = find_cases(dicom / "DCM_001_0001")
    assert case.case_id == "DCM_001" and case.images == (dicom / "DCM_001_0000", dicom / "DCM_001_0001")
    (dicom.parent / "LICENSE").write_text("a file without a suffix is no DICOM series")
    assert [c.case_id for c in find_cases(dicom.parent)] == ["DCM_001", "DCM_002"]  # searched in imagesTr
    brats = synthetic.write_brats(tmp_path / "brats", 5, shape=(6, 8, 8))
    folder = sorted(p for p in brats.iterdir() if p.is_dir())[0]
    (case,) = find_cases(folder)
    assert case.case_id == folder.name and len(case.images) == 4
    with pytest.raises(DatasetError, match="dataset.json is not an image file"):
        find_cases(dicom.parent / "dataset.json")
