"""Read and write images with exact geometry.

NIfTI goes through nibabel (its header is kept verbatim and restored on write); every
other ITK format (NRRD, MHA, ...) and DICOM series folders go through SimpleITK.
Arrays come back channel-first in ``(C, z, y, x)`` order, see :mod:`autoseg.core.geometry`.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from autoseg.core.files import atomic_path, atomic_write_bytes
from autoseg.core.geometry import DIRECTION_ATOL, Geometry, decode_header, encode_header

#: LPS <-> RAS flip applied to NIfTI affines so nibabel and ITK geometries agree.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: The most values (voxels x channels) one image may declare: 2048^3, far above any scan (a
#: 512x512x2000 CT holds 0.5e9). A header above it is refused before anything is allocated.
MAX_VOXELS = 2048**3
_SCALING_BLOCK = 1 << 22


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image suffix (``case_0000.nii.gz`` -> ``case_0000``)."""
    lower = name.lower()
    for suffix in ITK_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_channels(paths: Sequence[Path]) -> tuple[np.ndarray, Geometry]:
    """Read one or more files (each 3D or 4D) into a float32 ``(C, z, y, x)`` array.

    All files must share one voxel grid; the geometry of the first is returned.
    """
    arrays, geometry = [], None
    for path in paths:
        data, geo = _read_any(Path(path))
        if data.ndim == 3:
            data = data[None]
        if geometry is None:
            geometry = geo
        else:
            problems = geometry.mismatches(geo)
            if problems:
                raise ValueError(
                    f"{Path(path).name} is not on the grid of {Path(paths[0]).name}: {'; '.join(problems)}"
                )
        arrays.append(data.astype(np.float32, copy=False))
    assert geometry is not None, "read_channels needs at least one path"
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)), geometry


def describe_nonfinite(data: np.ndarray) -> str | None:
    """``"2 NaN/Inf voxel(s) in channel(s) [1]"`` for a ``(C, z, y, x)`` image, or None when every voxel is finite.

    A NaN reaching the network turns the whole case into background without a word, so
    ``plan`` and ``predict`` both refuse such images with this one description.
    """
    counts = _nonfinite_counts(data)
    if not any(counts):
        return None
    return f"{sum(counts)} NaN/Inf voxel(s) in channel(s) {[c for c, n in enumerate(counts) if n]}"


def replace_nonfinite(data: np.ndarray) -> str | None:
    """Replace NaN and -Inf by the channel's finite minimum and +Inf by its finite maximum, in place.

    The extremes keep the channel's intensity range (and so its normalisation) unchanged, and
    the minimum is background-like in CT (air) and MRI (0), where 0 would be soft tissue in CT.
    Returns what was replaced (for the case's report), or None when nothing was.
    """
    described = describe_nonfinite(data)
    if described is None:
        return None
    for index, count in enumerate(_nonfinite_counts(data)):
        if count == 0:
            continue
        finite = data[index][np.isfinite(data[index])]
        if finite.size == 0:
            raise ValueError(f"channel {index} has no finite voxel to replace NaN/Inf with")
        low, high = finite.min(), finite.max()
        np.nan_to_num(data[index], copy=False, nan=low, neginf=low, posinf=high)
    return f"replaced {described} (NaN and -Inf by the channel's minimum, +Inf by its maximum)"


def _nonfinite_counts(data: np.ndarray) -> list[int]:
    return [int(np.count_nonzero(~np.isfinite(channel))) for channel in data]


def read_label(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read an integer label map ``(z, y, x)``; non-integral real values (also after scaling) are an error."""
    path = Path(path)
    data, geometry = _read_any(path)
    try:
        return _integer_labels(data), geometry
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc


def _integer_labels(data: np.ndarray) -> np.ndarray:
    """``data`` as uint8 (int16 if needed) labels ``(z, y, x)``, refusing anything that is not one."""
    if data.ndim == 4 and data.shape[0] == 1:  # (x, y, z, 1): a 3D map saved with a singleton 4th axis
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"a label map must be 3D, it has {data.shape[0]} volumes along a 4th axis")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise ValueError("label map holds NaN or Inf values")
        rounded = np.rint(data)
        fractional = rounded != data
        if fractional.any():
            raise ValueError(f"label map holds non-integer values (e.g. {data[fractional][0]:g})")
        data = rounded
    if data.min() < np.iinfo(np.int16).min or data.max() > np.iinfo(np.int16).max:
        raise ValueError("label values do not fit in 16 bits")
    small = data.min() >= 0 and data.max() <= np.iinfo(np.uint8).max
    return data.astype(np.uint8 if small else np.int16, copy=False)


def read_geometry(path: Path) -> Geometry:
    """Geometry of a file without reading its voxels (for quick checks)."""
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)[1]
    if is_nifti(path):
        img = nib.load(str(path))
        return _nifti_geometry(img)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _itk_geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def write_label(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a ``(z, y, x)`` label map as uint8 (int16 if needed) in the input's geometry."""
    dtype = np.uint8 if array.min() >= 0 and array.max() <= 255 else np.int16
    write_array(array.astype(dtype, copy=False), geometry, path)


def write_array(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a ``(z, y, x)`` or ``(C, z, y, x)`` array atomically with ``geometry`` restored."""
    path = Path(path)
    if tuple(array.shape[-3:]) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    if is_nifti(path) and geometry.nifti_header is not None:
        payload = _nifti_bytes(array, geometry, compressed=path.name.lower().endswith(".gz"))
        atomic_write_bytes(path, payload)
        return
    _write_itk(array, geometry, path)


# --------------------------------------------------------------------------- readers


def _read_any(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read an image file or DICOM series folder; any decoding failure is a ValueError naming it.

    nibabel, zlib, gzip and SimpleITK each raise their own exception types for a corrupt or
    foreign file; callers catch ``(OSError, ValueError)`` and report the case, so every
    reader failure must arrive as one of those, and the case's message must say which file.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        return _read_nifti(path) if is_nifti(path) else _read_itk(path)
    except OSError:
        raise
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc
    except MemoryError as exc:  # a declared size under MAX_VOXELS that this machine cannot hold
        raise ValueError(f"{path.name}: not enough memory to read this image") from exc
    except Exception as exc:  # e.g. nibabel's ImageFileError, zlib.error, EOFError, SimpleITK's RuntimeError
        raise ValueError(f"{path.name} is not a readable image ({type(exc).__name__}: {exc})") from exc


def check_voxel_limit(shape: Sequence[int], pixel: str) -> None:
    """Refuse a header declaring more than :data:`MAX_VOXELS` values, before anything is allocated.

    The header alone decides how much memory a reader allocates; a corrupt or hostile header
    must fail at once, not after gigabytes (or with an empty MemoryError).
    """
    values = math.prod(int(s) for s in shape)
    if values > MAX_VOXELS:
        raise ValueError(
            f"{_declared(shape, pixel)} ({values:.3g} values), more than the {MAX_VOXELS:.3g} (2048^3) autoseg reads"
        )


def _truncated(shape: Sequence[int], dtype: np.dtype, held: int) -> str:
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    return f"truncated file: {_declared(shape, dtype.name)} ({nbytes:,} bytes of voxels) but the file holds {held:,}"


def _declared(shape: Sequence[int], pixel: str) -> str:
    return f"the header declares shape {'x'.join(str(int(s)) for s in shape)} {pixel}"


def _read_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    img = nib.load(str(path))
    proxy = img.dataobj  # nibabel moves scl_slope/scl_inter from the header into the proxy at load
    dtype = np.dtype(proxy.dtype)
    check_voxel_limit(proxy.shape, dtype.name)
    if path.name.lower().endswith(".gz"):
        stored = _read_gzipped_voxels(path, proxy)
    else:  # uncompressed: memory-mapped, pages are read as they are touched
        held = max(path.stat().st_size - int(proxy.offset), 0)
        if held < math.prod(proxy.shape) * dtype.itemsize:
            raise ValueError(_truncated(proxy.shape, dtype, held))
        stored = proxy.get_unscaled()
    data = apply_scaling(stored, proxy.slope, proxy.inter)
    if data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, 1, c) vector images
        data = data[:, :, :, 0, :]
    if data.ndim == 4:
        data = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    elif data.ndim == 3:
        data = np.ascontiguousarray(data.transpose(2, 1, 0))
    else:
        raise ValueError(f"expected a 3D or 4D image, got {data.ndim}D")
    return data, _nifti_geometry(img)


def apply_scaling(stored: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """The real values ``stored * slope + inter`` (NIfTI scl_slope/scl_inter) as float32; ``stored`` if unscaled.

    Computed in float64 block by block, as nibabel's ``get_fdata`` does, so every reader gives
    the same values to the bit while the memory stays one float32 copy.
    """
    if slope == 1.0 and inter == 0.0:
        return stored
    order = "F" if stored.flags.f_contiguous else "C"
    scaled = np.empty(stored.shape, np.float32, order=order)
    source, target = stored.reshape(-1, order=order), scaled.reshape(-1, order=order)
    for start in range(0, source.size, _SCALING_BLOCK):
        block = slice(start, start + _SCALING_BLOCK)
        target[block] = source[block].astype(np.float64) * slope + inter
    return scaled


def _read_gzipped_voxels(path: Path, proxy) -> np.ndarray:
    """Decompress the stored voxel block straight into its final buffer.

    Python's gzip module (used by nibabel) decompresses into a temporary copy, doubling
    the peak memory of a large case; streaming zlib into one preallocated array does not.
    The buffer is left uninitialised, so the operating system only commits the pages that
    decompressed data reach: a header that promises more than the stream holds costs
    nothing before the stream ends.
    """
    dtype, offset, shape = np.dtype(proxy.dtype), int(proxy.offset), tuple(proxy.shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes, np.uint8)
    filled, skipped = 0, 0
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        pending = b""
        while filled < nbytes:
            if not pending:
                pending = decompressor.unconsumed_tail or f.read(1 << 20)
                if not pending:
                    break
            chunk = decompressor.decompress(pending, 1 << 24)
            pending = decompressor.unconsumed_tail
            if decompressor.eof and decompressor.unused_data:  # concatenated gzip members
                pending = decompressor.unused_data
                decompressor = zlib.decompressobj(wbits=31)
            if skipped < offset:
                take = min(offset - skipped, len(chunk))
                skipped += take
                chunk = chunk[take:]
            n = min(len(chunk), nbytes - filled)
            buffer[filled : filled + n] = np.frombuffer(chunk, np.uint8, n)
            filled += n
    if filled != nbytes:
        raise ValueError(_truncated(shape, dtype, filled))
    return np.ndarray(shape, dtype, buffer=buffer, order="F")


def _nifti_geometry(img) -> Geometry:
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    spacing_xyz = np.linalg.norm(affine[:3, :3], axis=0)
    if np.allclose(spacing_xyz, zooms, rtol=1e-4):  # pixdim is exact where the affine is float32-rounded
        spacing_xyz = zooms
    direction = _RAS_TO_LPS @ (affine[:3, :3] / spacing_xyz)
    origin = _RAS_TO_LPS @ affine[:3, 3]
    shape_xyz = img.shape[:3]
    return Geometry(
        shape=tuple(int(s) for s in reversed(shape_xyz)),
        spacing=tuple(float(s) for s in reversed(spacing_xyz)),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
        nifti_header=encode_header(img.header.binaryblock),
    )


def _read_itk(path: Path) -> tuple[np.ndarray, Geometry]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    check_voxel_limit(
        _itk_values_shape(reader.GetSize(), reader.GetNumberOfComponents()),
        sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )
    return _from_sitk(reader.Execute())


def _itk_values_shape(size: Sequence[int], components: int) -> tuple[int, ...]:
    """The declared size, with the components per voxel as a last axis when there are several."""
    return (*size, components) if components > 1 else tuple(size)


def _from_sitk(image) -> tuple[np.ndarray, Geometry]:
    data = sitk.GetArrayFromImage(image)  # (z, y, x[, comp]) or (t, z, y, x)
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        data = np.moveaxis(data, -1, 0)
    if dim not in (3, 4):
        raise ValueError(f"expected a 3D or 4D image, got {dim}D")
    size, spacing = image.GetSize()[:3], image.GetSpacing()[:3]
    origin = image.GetOrigin()[:3]
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    return np.ascontiguousarray(data), _itk_geometry(size, spacing, origin, direction.ravel())


def _itk_geometry(size, spacing, origin, direction) -> Geometry:
    direction = np.asarray(direction, dtype=np.float64)
    if direction.size == 16:
        direction = direction.reshape(4, 4)[:3, :3].ravel()
    return Geometry(
        shape=tuple(int(s) for s in reversed(size[:3])),
        spacing=tuple(float(s) for s in reversed(spacing[:3])),
        origin=tuple(float(o) for o in origin[:3]),
        direction=tuple(float(d) for d in direction),
    )


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, Geometry]:
    """Read the single DICOM series in ``folder``, refusing uneven spacing or mixed orientation."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ValueError("no DICOM series found in this folder")
    if len(series) > 1:
        raise ValueError(f"the folder holds {len(series)} DICOM series; put one series per folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    check_dicom_slices(files)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    check_voxel_limit(
        _itk_values_shape((*first.GetSize()[:2], len(files)), first.GetNumberOfComponents()),
        sitk.GetPixelIDValueAsString(first.GetPixelID()),
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _from_sitk(reader.Execute())


#: In-plane offset between slices (mm) beyond which a DICOM series is sheared, not a stack.
IN_PLANE_ATOL_MM = 0.01


def check_dicom_slices(files: Sequence[str]) -> None:
    """Raise if the slices of a series are not one evenly spaced stack of one orientation."""
    if len(files) < 2:
        raise ValueError("a DICOM series needs at least 2 slices")
    positions, orientations = [], []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        try:
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            orientations.append([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        except RuntimeError as exc:
            raise ValueError(f"slice {Path(name).name} lacks ImagePositionPatient/ImageOrientationPatient") from exc
    orientations = np.asarray(orientations)
    if np.abs(orientations - orientations[0]).max() > DIRECTION_ATOL:
        raise ValueError("the series mixes slice orientations (ImageOrientationPatient differs between slices)")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    positions = np.asarray(positions)
    in_plane = positions @ np.stack([row, col]).T
    shift = float(np.abs(in_plane - in_plane[0]).max())
    if shift > IN_PLANE_ATOL_MM:
        raise ValueError(
            f"the slices are shifted within their plane by up to {shift:.3g} mm (a sheared stack, "
            "e.g. CT gantry tilt): it is no regular grid; resample it to one first"
        )
    depth = np.sort(positions @ normal)
    gaps = np.diff(depth)
    if gaps.min() <= 1e-6:
        raise ValueError("the series has two slices at the same position")
    median_gap = float(np.median(gaps))
    if float(np.abs(gaps - median_gap).max()) > max(1e-3, 0.01 * median_gap):
        raise ValueError(
            f"uneven slice spacing: gaps range from {gaps.min():.4g} to {gaps.max():.4g} mm (missing slices?)"
        )


# --------------------------------------------------------------------------- writers


def _nifti_bytes(array: np.ndarray, geometry: Geometry, compressed: bool) -> bytes:
    import gzip

    raw_header = decode_header(geometry.nifti_header)
    header_cls = nib.Nifti1Header if len(raw_header) == 348 else nib.Nifti2Header
    header = header_cls.from_fileobj(io.BytesIO(raw_header), check=False)
    data = array.transpose(2, 1, 0) if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    header.set_data_dtype(array.dtype)
    header.set_data_shape(data.shape)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 0
    image_cls = nib.Nifti1Image if header_cls is nib.Nifti1Header else nib.Nifti2Image
    image = image_cls(data, None, header=header)
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compressed else raw


def _write_itk(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1) if array.ndim == 4 else array, isVector=array.ndim == 4)
    image.SetSpacing(tuple(reversed(geometry.spacing)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
