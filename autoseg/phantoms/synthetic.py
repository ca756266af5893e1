"""Phantom datasets with known answers, for the demo and the tests.

``brain_case`` draws a skull-stripped head (zero background) of varying size with white
and grey matter, ventricles, CSF around the cortex and a glioma-like tumour whose
compartments are nested the way real ones are: a necrotic core (label 2) inside an
enhancing rim (label 3) inside edema (label 1). The four channels follow the real
sequences' contrasts (edema bright in FLAIR/T2, the rim bright in T1gd, necrosis dark in
T1), with a bias field, noise and a per-case intensity scale; every fourth case has no
enhancing tumour. ``ct_case`` draws an anisotropic single-channel CT-like body with two
organs. Writers put the cases on disk in every layout autoseg reads, as real NIfTI (or
DICOM) files with oblique affines; the same seed gives the same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.core.files import write_json

#: Mean intensity of (background, white matter, grey matter, CSF, edema, necrosis, rim) per channel.
_BRAIN_CONTRAST = {
    "FLAIR": (0, 0.55, 0.65, 0.15, 1.00, 0.55, 0.75),
    "T1w": (0, 0.80, 0.60, 0.20, 0.50, 0.25, 0.55),
    "T1gd": (0, 0.80, 0.60, 0.20, 0.50, 0.25, 1.00),
    "T2w": (0, 0.40, 0.55, 1.00, 0.90, 0.95, 0.70),
}
BRAIN_LABELS = {"background": 0, "edema": 1, "non-enhancing tumour": 2, "enhancing tumour": 3}


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Normalised coordinates in [-1, 1] per axis."""
    return list(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))


def _blob(coords, centre, radii, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """Signed 'radius' field of an irregular ellipsoid (< 1 inside)."""
    d = sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii))
    angle = np.arctan2(coords[1] - centre[1], coords[2] - centre[2])
    polar = (coords[0] - centre[0]) / radii[0]
    k1, k2 = rng.integers(2, 5, size=2)
    bumps = 1 + wobble * (np.sin(k1 * angle + rng.uniform(0, 6.3)) * np.cos(k2 * polar + rng.uniform(0, 6.3)))
    return np.sqrt(d) / bumps


def brain_case(shape: Sequence[int], rng: np.random.Generator, enhancing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: float32 channels ``(4, z, y, x)`` and uint8 labels ``(z, y, x)``."""
    coords = _grid(shape)
    scale = rng.uniform(0.9, 1.05, size=3)  # heads differ in size and proportions
    head_field = _blob(coords, [0, 0, 0], [0.8, 0.85, 0.75] * scale, rng, 0.03)
    head = head_field < 1
    white = _blob(coords, [0, 0, 0], [0.55, 0.6, 0.5] * scale, rng, 0.08) < 1
    ventricles = _blob(coords, [0.05, 0, 0], [0.25, 0.12, 0.3] * scale, rng, 0.1) < 1
    tissue = np.where(head, 2, 0)
    tissue[white & head] = 1
    tissue[head & (head_field > 0.94)] = 3  # CSF around the cortex
    tissue[ventricles & head] = 3
    centre = rng.uniform(-0.3, 0.3, size=3)
    size = rng.uniform(0.22, 0.38)
    tumour = _blob(coords, centre, size * rng.uniform(0.8, 1.2, size=3), rng, 0.15)
    label = np.zeros(shape, np.uint8)
    label[(tumour < 1.0) & head] = 1
    core_radius = rng.uniform(0.45, 0.6)
    if enhancing:
        label[(tumour < core_radius + 0.2) & head] = 3
    label[(tumour < core_radius) & head] = 2
    tissue[label == 1] = 4
    tissue[label == 2] = 5
    tissue[label == 3] = 6
    bias = 1 + 0.15 * coords[0] * rng.uniform(-1, 1) + 0.1 * coords[1] * rng.uniform(-1, 1)
    channels = []
    for means in _BRAIN_CONTRAST.values():
        image = np.asarray(means, np.float32)[tissue] * bias
        image += rng.normal(0, 0.04, size=shape).astype(np.float32)
        image = np.where(head, np.clip(image, 0.01, None), 0) * rng.uniform(300, 1500)
        channels.append(image.astype(np.float32))
    return np.stack(channels), label


def ct_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen-like CT phantom in Hounsfield units ``(1, z, y, x)`` with two organs (labels 1, 2)."""
    coords = _grid(shape)
    body = _blob(coords, [0, 0, 0], [1.3, 0.8, 0.9], rng, 0.03) < 1
    organ = _blob(coords, rng.uniform(-0.2, 0.2, 3), [0.9, 0.35, 0.3], rng, 0.1) < 1
    lesion = _blob(coords, rng.uniform(-0.1, 0.1, 3), [0.4, 0.12, 0.12], rng, 0.1) < 1
    label = np.zeros(shape, np.uint8)
    label[organ & body] = 1
    label[lesion & organ & body] = 2
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 0
    hu[label == 1] = 60
    hu[label == 2] = 120
    hu += rng.normal(0, 15, size=shape).astype(np.float32)
    return hu[None], label


def random_affine(spacing_zyx: Sequence[float], rng: np.random.Generator, oblique: bool = True) -> np.ndarray:
    """A NIfTI (RAS, x-y-z voxel order) affine with the given spacing and a small rotation."""
    angle = rng.uniform(-0.3, 0.3) if oblique else 0.0
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(list(reversed(spacing_zyx)))
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine


def _save_nifti(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save ``(z, y, x)`` or ``(C, z, y, x)`` in NIfTI voxel order ``(x, y, z[, C])``."""
    import nibabel as nib

    data = array_zyx.transpose(2, 1, 0) if array_zyx.ndim == 3 else array_zyx.transpose(3, 2, 1, 0)
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def _cases(n: int, seed: int, shape, spacing, kind: str):
    rng = np.random.default_rng(seed)
    for i in range(n):
        if kind == "brain":
            image, label = brain_case(shape, rng, enhancing=(i % 4 != 3))
        else:
            image, label = ct_case(shape, rng)
        yield i, image, label, random_affine(spacing, rng)


def write_msd_brain(
    root: Path, n_cases: int, shape=(32, 40, 36), spacing=(1.0, 1.0, 1.0), seed: int = 0, n_test: int = 0
) -> Path:
    """MSD Task01 layout: 4D NIfTI images, int -> name labels, a ``training`` list.

    ``n_test`` more cases go to ``imagesTs/`` (listed under ``test``, as in MSD) with their
    truth in ``labelsTs/`` (which MSD withholds), so predictions on them can be scored.
    The training cases are the same with or without test cases.
    """
    root = Path(root)
    training, test = [], []
    for i, image, label, affine in _cases(n_cases + n_test, seed, shape, spacing, "brain"):
        case = f"BRATS_{i + 1:03d}"
        images, labels = ("imagesTr", "labelsTr") if i < n_cases else ("imagesTs", "labelsTs")
        _save_nifti(image, affine, root / images / f"{case}.nii.gz")
        _save_nifti(label, affine, root / labels / f"{case}.nii.gz")
        if i < n_cases:
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            test.append(f"./imagesTs/{case}.nii.gz")
    write_json(
        root / "dataset.json",
        {
            "name": "BRATS",
            "tensorImageSize": "4D",
            "modality": {str(i): n for i, n in enumerate(_BRAIN_CONTRAST)},
            "labels": {str(v): k for k, v in BRAIN_LABELS.items()},
            "numTraining": n_cases,
            "numTest": n_test,
            "training": training,
            "test": test,
        },
    )
    return root


def write_nnunet_brain(
    root: Path,
    n_cases: int,
    shape=(32, 40, 36),
    spacing=(1.0, 1.0, 1.0),
    seed: int = 0,
    channels: Sequence[str] = tuple(_BRAIN_CONTRAST),
    labels: dict[str, Sequence[int]] | None = None,
    n_test: int = 0,
) -> Path:
    """nnU-Net v2 raw layout of the brain phantom: ``CASE_000X.nii.gz`` channel files.

    ``channels`` picks the phantom's sequences and their order (another protocol, e.g. one
    without T1w); ``labels`` names the classes, each merging phantom labels (e.g.
    ``{"edema": [1], "tumour core": [2, 3]}`` gives values 1 and 2; default the phantom's).
    ``n_test`` more cases go to ``imagesTs/`` with their truth in ``labelsTs/``, as in
    :func:`write_msd_brain`.
    """
    root = Path(root)
    unknown = [c for c in channels if c not in _BRAIN_CONTRAST]
    if unknown:
        raise ValueError(f"unknown phantom channel(s) {unknown}; the phantom has {list(_BRAIN_CONTRAST)}")
    order = [list(_BRAIN_CONTRAST).index(c) for c in channels]
    names, relabel = _merged_labels(labels)
    for i, image, label, affine in _cases(n_cases + n_test, seed, shape, spacing, "brain"):
        case = f"BRATS_{i + 1:03d}"
        images, truth = ("imagesTr", "labelsTr") if i < n_cases else ("imagesTs", "labelsTs")
        for c, source in enumerate(order):
            _save_nifti(image[source], affine, root / images / f"{case}_{c:04d}.nii.gz")
        _save_nifti(relabel[label], affine, root / truth / f"{case}.nii.gz")
    write_json(
        root / "dataset.json",
        {
            "channel_names": {str(i): n for i, n in enumerate(channels)},
            "labels": names,
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        },
    )
    return root


def _merged_labels(labels: dict[str, Sequence[int]] | None) -> tuple[dict[str, int], np.ndarray]:
    """dataset.json labels and the lookup table from phantom label to written value."""
    if labels is None:
        return dict(BRAIN_LABELS), np.arange(len(BRAIN_LABELS), dtype=np.uint8)
    relabel = np.zeros(len(BRAIN_LABELS), np.uint8)
    for value, merged in enumerate(labels.values(), start=1):
        relabel[list(merged)] = value
    return {"background": 0, **{name: v for v, name in enumerate(labels, start=1)}}, relabel


def write_brats(root: Path, n_cases: int, shape=(32, 40, 36), seed: int = 0) -> Path:
    """BraTS challenge layout: one folder per case, labels in the 0/1/2/4 convention."""
    root = Path(root)
    to_brats = np.array([0, 2, 1, 4], np.uint8)  # phantom 1 edema, 2 core, 3 rim -> BraTS 2 ED, 1 NCR, 4 ET
    for i, image, label, affine in _cases(n_cases, seed, shape, (1.0, 1.0, 1.0), "brain"):
        case = f"BraTS2021_{i:05d}"
        for c, suffix in enumerate(("flair", "t1", "t1ce", "t2")):
            _save_nifti(image[c], affine, root / case / f"{case}_{suffix}.nii.gz")
        _save_nifti(to_brats[label], affine, root / case / f"{case}_seg.nii.gz")
    return root


def write_nnunet_ct(root: Path, n_cases: int, shape=(12, 48, 40), spacing=(4.0, 0.8, 0.8), seed: int = 0) -> Path:
    """Anisotropic single-channel CT-like dataset in the nnU-Net v2 layout."""
    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    for i, image, label, affine in _cases(n_cases, seed, shape, spacing, "ct"):
        case_spacing = (spacing[0] * rng.choice([0.8, 1.0, 1.25]), *spacing[1:])
        affine[:3, 2] *= case_spacing[0] / spacing[0]
        case = f"CT_{i + 1:03d}"
        _save_nifti(image[0], affine, root / "imagesTr" / f"{case}_0000.nii.gz")
        _save_nifti(label, affine, root / "labelsTr" / f"{case}.nii.gz")
    write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "organ": 1, "lesion": 2},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        },
    )
    return root


def write_dicom_series(
    volume_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    folder: Path,
    origin=(0.0, 0.0, 0.0),
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    positions_z: Sequence[float] | None = None,
    description: str = "",
) -> None:
    """Write an int16 DICOM series, one file per slice (positions may be uneven, for tests)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    depths = (
        positions_z if positions_z is not None else [origin[2] + k * spacing_zyx[0] for k in range(len(volume_zyx))]
    )
    for k, plane in enumerate(volume_zyx):
        image = sitk.GetImageFromArray(np.rint(plane).astype(np.int16)[None])
        image.SetSpacing((spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0052": series_uid + ".9",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in (origin[0], origin[1], depths[k])),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing_zyx[0]),
            "0028|0030": f"{spacing_zyx[1]}\\{spacing_zyx[2]}",
        }
        if description:
            tags["0008|103e"] = description
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(image)


def write_dicom_brain(root: Path, n_cases: int, shape=(24, 32, 28), spacing=(2.0, 1.0, 1.0), seed: int = 0) -> Path:
    """nnU-Net-style dataset whose channels are DICOM series folders and labels NIfTI."""
    import SimpleITK as sitk

    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        image, label = brain_case(shape, rng)
        case = f"DCM_{i + 1:03d}"
        uid = f"1.2.826.0.1.3680043.2.1125.{seed}.{i + 1}"
        for c in range(2):
            write_dicom_series(image[c], spacing, root / "imagesTr" / f"{case}_{c:04d}", series_uid=f"{uid}.{c}")
        label_image = sitk.GetImageFromArray(label)
        label_image.SetSpacing(tuple(reversed(spacing)))
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(label_image, str(root / "labelsTr" / f"{case}.nii.gz"))
    write_json(
        root / "dataset.json",
        {
            "channel_names": {"0": "FLAIR", "1": "T1w"},
            "labels": BRAIN_LABELS,
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        },
    )
    return root


def write_lying_nifti(path: Path, shape_xyz: Sequence[int] = (1024, 1024, 512)) -> Path:
    """A hostile input: a real NIfTI-1 file whose header declares ``shape_xyz`` float32 but that holds 16 voxels.

    Gzipped (``.nii.gz``) it is a few dozen bytes; readers must refuse it without allocating
    what the header promises.
    """
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape_xyz))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + bytes(4) + np.arange(16, dtype=np.float32).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.lower().endswith(".gz") else raw)
    return path
