"""Every reader returns the real voxel values, and no header decides an allocation on its own.

Real values: NIfTI scl_slope/scl_inter and DICOM RescaleSlope/RescaleIntercept are applied by
every reader, compressed or not, checked on third-party files shipped inside nibabel and
pydicom against those libraries' (and SimpleITK's) own reading.
Allocation: a tiny file whose header declares gigabytes is refused at once, naming the file
and the declared shape, by the reader and by `show` and `plan`.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.data.io.images import MAX_VOXELS, read_channels, read_label
from autoseg.phantoms import synthetic

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
NIBABEL_NIFTI = sorted(p.name for p in NIBABEL_DATA.iterdir() if p.name.endswith((".nii", ".nii.gz")))
#: every NIfTI volume nibabel ships (its CIFTI-2 matrix ``row_major.dconn.nii`` is no volume)
NIBABEL_VOLUMES = [n for n in NIBABEL_NIFTI if len(nib.load(NIBABEL_DATA / n).shape) >= 3]


def other_compression(source: Path, folder: Path) -> Path:
    """A copy of ``source`` gzipped (``.nii``) or gunzipped (``.nii.gz``): the same image stored the other way."""
    if source.name.endswith(".gz"):
        target = folder / source.name.removesuffix(".gz")
        target.write_bytes(gzip.decompress(source.read_bytes()))
    else:
        target = folder / (source.name + ".gz")
        target.write_bytes(gzip.compress(source.read_bytes()))
    return target


def as_channels(xyz: np.ndarray) -> np.ndarray:
    """nibabel's (x, y, z[, t]) array in autoseg's (C, z, y, x) order."""
    return (xyz[..., None] if xyz.ndim == 3 else xyz).transpose(3, 2, 1, 0)


def set_scaling(path: Path, slope: float, inter: float) -> None:
    """Write scl_slope/scl_inter into an existing NIfTI-1 file's header, leaving its stored voxels as they are."""
    compressed = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]))
    header["scl_slope"], header["scl_inter"] = slope, inter
    raw = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(raw) if compressed else raw)


# --------------------------------------------------------------------------- real values


def test_nibabel_test_data_has_a_scaled_file():
    """The comparison below is only worth something if nibabel ships a file that is really scaled."""
    assert "functional.nii" in NIBABEL_VOLUMES and len(NIBABEL_VOLUMES) >= 5
    proxy = nib.load(NIBABEL_DATA / "functional.nii").dataobj
    assert (proxy.slope, proxy.inter) != (1.0, 0.0)


@pytest.mark.parametrize("name", NIBABEL_VOLUMES)
def test_nibabel_files_read_as_nibabel_and_simpleitk_read_them_compressed_or_not(name, tmp_path):
    source = tmp_path / name
    shutil.copy(NIBABEL_DATA / name, source)
    reference = as_channels(nib.load(source).get_fdata()).astype(np.float32)
    for path in (source, other_compression(source, tmp_path)):
        data, _ = read_channels([path])
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data, reference, err_msg=path.name)
    try:
        by_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))  # (t, z, y, x)
    except RuntimeError:  # SimpleITK does not read NIfTI-2
        assert nib.load(source).header.sizeof_hdr == 540
        return
    finite = np.isfinite(reference)  # SimpleITK turns NaN voxels into 0; autoseg keeps them (plan/predict refuse)
    np.testing.assert_array_equal(data[finite], by_itk.reshape(reference.shape).astype(np.float32)[finite])


def test_a_nifti_that_is_no_volume_is_refused_by_name():
    names = sorted(set(NIBABEL_NIFTI) - set(NIBABEL_VOLUMES))
    assert names
    for name in names:
        with pytest.raises(ValueError, match=rf"^{name}: expected a 3D or 4D image"):
            read_channels([NIBABEL_DATA / name])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_int16_reads_as_real_values(suffix, tmp_path):
    """The issue's example: int16 value 100 with slope 2 and intercept -1024 is -824 however it is stored."""
    path = tmp_path / f"ct{suffix}"
    nib.save(nib.Nifti1Image(np.full((5, 6, 7), 100, np.int16), np.diag([0.8, 0.8, 2.5, 1])), path)
    set_scaling(path, 2.0, -1024.0)
    assert nib.load(path).get_fdata()[0, 0, 0] == -824  # the file really says so
    data, _ = read_channels([path])
    assert data.shape == (1, 7, 6, 5) and np.all(data == -824)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_label_with_fractional_real_values_is_refused(suffix, tmp_path):
    path = tmp_path / f"label{suffix}"
    stored = np.zeros((5, 6, 7), np.int16)
    stored[1:3, 2:4, 3:5] = 2
    stored[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(stored, np.eye(4)), path)
    set_scaling(path, 0.5, 0.0)  # real values 0, 0.5 and 1
    with pytest.raises(ValueError, match=rf"label{suffix}: label map holds non-integer values \(e.g. 0.5\)"):
        read_label(path)
    set_scaling(path, 2.0, 1.0)  # real values 1, 3 and 5: integers, read as such
    labels, _ = read_label(path)
    assert labels.dtype == np.uint8 and sorted(np.unique(labels).tolist()) == [1, 3, 5]


def test_plan_refuses_an_int16_label_scaled_by_one_half(tmp_path, run_cli):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset001_Brain", 3, shape=(16, 20, 18))
    label = dataset / "labelsTr" / "BRATS_002.nii.gz"
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine, image.header), label)
    set_scaling(label, 0.5, 0.0)  # stored 0..3 are declared labels; the real values 0, 0.5, 1, 1.5 are not
    work = tmp_path / "work"
    result = run_cli("plan", "-d", dataset, "-w", work, "-j", "1", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "case BRATS_002: cannot read label BRATS_002.nii.gz: label map holds non-integer values" in result.output
    assert "Traceback" not in result.output and not (work / dataset.name).exists()


PYDICOM_CT_SERIES = "dicomdirtests/98892001/CT5N"  # five 16x16 CT slices, 2.5 mm apart, RescaleIntercept -1024
PYDICOM_SLICES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    *(f"{PYDICOM_CT_SERIES}/{n}" for n in ("2062", "2392", "2693", "3023", "3353")),
]


def pydicom_file(name: str) -> Path:
    """A file of pydicom's own test data (installed with the `test` extra)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).parent / name


def pydicom_values(path: Path) -> np.ndarray:
    """pydicom's pixels with the modality LUT (RescaleSlope/RescaleIntercept) applied."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    dataset = pydicom.dcmread(path)
    return apply_modality_lut(dataset.pixel_array, dataset)


@pytest.mark.parametrize("name", PYDICOM_SLICES)
def test_pydicom_slices_read_as_pydicom_and_simpleitk_rescale_them(name):
    source = pydicom_file(name)
    reference = pydicom_values(source).astype(np.float32)
    data, _ = read_channels([source])
    assert data.shape == (1, 1, *reference.shape)
    np.testing.assert_array_equal(data[0, 0], reference)
    np.testing.assert_array_equal(data[0, 0], sitk.GetArrayFromImage(sitk.ReadImage(str(source)))[0])


def test_pydicom_ct_series_reads_in_hounsfield_units(tmp_path):
    import pydicom

    folder = tmp_path / "ct"
    shutil.copytree(pydicom_file(PYDICOM_CT_SERIES), folder)
    slices = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    reference = np.stack([pydicom_values(p) for p in slices]).astype(np.float32)
    assert reference.min() < -800  # air in HU: the intercept was applied
    data, geometry = read_channels([folder])
    assert geometry.spacing[0] == pytest.approx(2.5)
    np.testing.assert_array_equal(data[0], reference)


# --------------------------------------------------------------------------- headers that lie


@pytest.mark.parametrize("name", ["lie.nii.gz", "lie.nii"])
def test_a_header_larger_than_its_file_is_refused_naming_file_and_shape(name, tmp_path):
    path = synthetic.write_lying_nifti(tmp_path / name)
    assert path.stat().st_size < 500
    with pytest.raises(
        ValueError,
        match=rf"^{name}: truncated file: the header declares shape 1024x1024x512 float32 "
        r"\(2,147,483,648 bytes of voxels\) but the file holds 64$",
    ):
        read_channels([path])


def test_a_header_above_the_voxel_limit_is_refused_before_reading(tmp_path):
    path = synthetic.write_lying_nifti(tmp_path / "huge.nii.gz", shape_xyz=(4096, 4096, 4096))
    assert 4096**3 > MAX_VOXELS >= 2048**3
    with pytest.raises(ValueError, match=r"^huge.nii.gz: the header declares shape 4096x4096x4096 float32 .*more than"):
        read_channels([path])
    image = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "huge.mha"))
    text = (tmp_path / "huge.mha").read_bytes().replace(b"DimSize = 8 8 8", b"DimSize = 4096 4096 4096")
    (tmp_path / "huge.mha").write_bytes(text)
    with pytest.raises(ValueError, match=r"^huge.mha: the header declares shape 4096x4096x4096 32-bit float"):
        read_channels([tmp_path / "huge.mha"])


def test_a_lying_gzip_header_costs_no_memory(tmp_path):
    """The streamed reader must not allocate (touch) the 2 GiB the header promises: a fresh process stays small."""
    path = synthetic.write_lying_nifti(tmp_path / "lie.nii.gz")
    script = (
        "import sys\n"
        "from autoseg.data.io.images import read_channels\n"
        "try:\n    read_channels([sys.argv[1]])\nexcept ValueError as exc:\n    print(exc)\n"
        # VmHWM starts afresh at exec; ru_maxrss would carry over the (large) pytest parent's peak
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, encoding="utf-8", errors="replace", timeout=60
    )
    message, peak_mb = done.stdout.strip().splitlines()
    assert "truncated file" in message, done.stderr
    assert int(peak_mb) < 1024, f"peak {peak_mb} MB for a {path.stat().st_size}-byte file"


def test_show_and_plan_refuse_a_lying_channel_file_in_one_line(tmp_path, run_cli):
    dataset = synthetic.write_nnunet_brain(tmp_path / "Dataset001_Brain", 2, shape=(16, 20, 18))
    synthetic.write_lying_nifti(dataset / "imagesTr" / "BRATS_002_0001.nii.gz")
    shown = run_cli("show", dataset / "imagesTr" / "BRATS_002_0001.nii.gz", "-o", tmp_path / "x.png")
    assert shown.exit_code == 1, shown.output
    lines = shown.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: case BRATS_002: cannot read image: BRATS_002_0001.nii.gz: "
        "truncated file: the header declares shape 1024x1024x512"
    ), lines
    assert not (tmp_path / "x.png").exists()
    work = tmp_path / "work"
    planned = run_cli("plan", "-d", dataset, "-w", work, "-j", "1", "--no-progress")
    assert planned.exit_code == 1, planned.output
    lines = planned.output.strip().splitlines()
    assert len(lines) == 1 and "case BRATS_002: cannot read image: BRATS_002_0001.nii.gz: truncated file" in lines[0]
    assert "1024x1024x512 float32" in lines[0] and not (work / dataset.name).exists()
