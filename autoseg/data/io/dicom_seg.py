"""Write a predicted label map as a DICOM Segmentation (SEG) that references its source series.

A radiology workflow (PACS, OHIF, 3D Slicer) takes masks back as DICOM-SEG, not NIfTI. The
SEG is written with highdicom (the optional extra ``autoseg[dicom]``): one binary segment per
label, or per region (a union of label values, e.g. BraTS whole tumour), each with a coded
category and type (:data:`KNOWN_CODES`, overridable per segment name), the source series'
patient, study and frame-of-reference attributes, and per frame the SOP Instance UID of the
source slice it lies on.

Geometry: the label array is on the grid autoseg reads from the series (SimpleITK, array
order ``(z, y, x)``). Each source file is matched to its array slice by its own
ImagePositionPatient, never by file name, instance number or listing order, so slices stored
in any order land on the right frame.

Empty segments: every segment is described in the SEG even when the prediction has no voxel
of it (a reader learns the structure was looked for and not found); frames without any
foreground are omitted, as the standard allows. A prediction that is empty everywhere keeps all its
(empty) frames, since a SEG needs at least one frame.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.core.errors import AutosegError
from autoseg.core.files import atomic_path, read_json
from autoseg.core.geometry import DIRECTION_ATOL
from autoseg.core.plan import foreground_labels
from autoseg.data.io.images import read_geometry

INSTALL_HINT = "pip install 'autoseg[dicom]'"
#: Key of the per-segment code overrides in dataset.json (see docs/dicom.md).
CODES_KEY = "dicom_seg_codes"


class DicomSegError(AutosegError):
    """A DICOM-SEG cannot be written for this mask and series (named in the message)."""


@dataclass(frozen=True)
class Code:
    """A coded concept: value, coding scheme (SCT = SNOMED CT, NCIt, DCM) and meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SegmentCodes:
    category: Code
    type: Code


@dataclass(frozen=True)
class Segment:
    """One SEG segment: the voxels whose label value is in ``values``."""

    name: str
    values: tuple[int, ...]


# Codes come from DICOM PS3.16 (as tabulated in pydicom.sr.codedict):
# CID 7150 "Segmentation Property Category", CID 7159 "Lesion Segmentation Type" and
# CID 7168/7169 "Brain Lesion Segmentation Type With/Without Necrosis". CID 7169 uses generic
# Edema (not a peritumoral-edema concept, see its note 2) and NCIt codes for (non-)enhancing
# lesion, because SNOMED CT has no imaging-enhancement concept; we follow the standard there.
_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")  # CID 7150
_EDEMA = Code("79654002", "SCT", "Edema")  # CID 7159, 7169
_NECROSIS = Code("6574001", "SCT", "Necrosis")  # CID 7159, 7168
_NON_ENHANCING = Code("C81175", "NCIt", "Non-Enhancing Lesion")  # CID 7169
_ENHANCING = Code("C113842", "NCIt", "Enhancing Lesion")  # CID 7169
_NEOPLASM = Code("108369006", "SCT", "Neoplasm")  # CID 7159
_LESION = Code("52988006", "SCT", "Lesion")  # CID 7159
_CYST = Code("367643001", "SCT", "Cyst")  # CID 7159
#: Segments with a name autoseg does not know: 3D Slicer's default terminology (Tissue / Tissue).
GENERIC_CODES = SegmentCodes(Code("85756007", "SCT", "Tissue"), Code("85756007", "SCT", "Tissue"))

_BY_TYPE: dict[Code, tuple[str, ...]] = {
    # BraTS ED / SNFH (surrounding non-enhancing FLAIR hyperintensity), MSD "edema".
    _EDEMA: ("edema", "peritumoraledema", "ed", "snfh", "surroundingnonenhancingflairhyperintensity"),
    # BraTS 2021+ label 1 NCR.
    _NECROSIS: ("necrosis", "necrotic", "ncr", "necrotictumorcore", "necroticcore"),
    # BraTS NCR/NET and NETC; autoseg's BraTS label 2 "non-enhancing tumor core"; MSD "non-enhancing tumor".
    _NON_ENHANCING: (
        "nonenhancingtumor",
        "nonenhancingtumorcore",
        "nonenhancinglesion",
        "net",
        "netc",
        "ncrnet",
        "necroticandnonenhancingtumorcore",
    ),
    _ENHANCING: ("enhancingtumor", "enhancingtumorcore", "enhancinglesion", "et"),
    # BraTS tumour core (TC = NCR + NET + ET, no edema): the neoplasm proper.
    _NEOPLASM: ("tumorcore", "tc", "tumor", "neoplasm"),
    # BraTS whole tumour (WT = TC + edema): the whole abnormal region.
    _LESION: ("wholetumor", "wt", "lesion"),
    _CYST: ("cyst",),
}
#: Normalised segment name -> codes (category, type); see :func:`normalise_name`.
KNOWN_CODES: dict[str, SegmentCodes] = {
    alias: SegmentCodes(_ABNORMAL, code) for code, aliases in _BY_TYPE.items() for alias in aliases
}


def normalise_name(name: str) -> str:
    """Lower case, British spellings made American, only letters and digits (``Tumour Core`` -> ``tumorcore``)."""
    text = name.lower().replace("tumour", "tumor").replace("oedema", "edema")
    return re.sub(r"[^a-z0-9]", "", text)


def codes_for(name: str, overrides: Mapping[str, SegmentCodes] | None = None) -> SegmentCodes:
    """The codes of a segment: the override for its exact name, else the known codes, else generic."""
    if overrides and name in overrides:
        return overrides[name]
    return KNOWN_CODES.get(normalise_name(name), GENERIC_CODES)


def parse_code_overrides(raw: Any, source: str = "dataset.json") -> dict[str, SegmentCodes]:
    """Read the ``"dicom_seg_codes"`` mapping of dataset.json: segment name -> category and type.

    ``{"liver": {"category": {"CodeValue": "91723000", "CodingSchemeDesignator": "SCT",
    "CodeMeaning": "Anatomical Structure"}, "type": {...}}}`` (dcmqi's attribute names).
    """
    where = f"{source} {CODES_KEY}"
    if not isinstance(raw, dict):
        raise DicomSegError(f"{where} must be an object mapping segment names to codes")
    return {str(name): _parse_segment_codes(entry, f"{where}[{name!r}]") for name, entry in raw.items()}


def dataset_code_overrides(dataset_dir: Path) -> dict[str, Any]:
    """``{"dicom_seg_codes": ...}`` of a dataset folder's dataset.json (checked now, not at the first DICOM-SEG),
    carried into the work folder so that prediction, also from an exported model, writes the codes the user
    chose; empty without them."""
    path = Path(dataset_dir) / "dataset.json"
    raw = read_json(path) if path.is_file() else {}
    if not isinstance(raw, dict) or CODES_KEY not in raw:
        return {}
    parse_code_overrides(raw[CODES_KEY], str(path))
    return {CODES_KEY: raw[CODES_KEY]}


def _parse_segment_codes(entry: Any, where: str) -> SegmentCodes:
    if not isinstance(entry, dict) or set(entry) != {"category", "type"}:
        raise DicomSegError(f"{where} must be an object with exactly the keys 'category' and 'type'")
    return SegmentCodes(
        _parse_code(entry["category"], f"{where}.category"), _parse_code(entry["type"], f"{where}.type")
    )


def _parse_code(raw: Any, where: str) -> Code:
    keys = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
    if not isinstance(raw, dict) or set(raw) != set(keys):
        raise DicomSegError(f"{where} must be an object with exactly the keys {', '.join(keys)}")
    values = [raw[k] for k in keys]
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise DicomSegError(f"{where}: {', '.join(keys)} must be non-empty strings")
    return Code(*(v.strip() for v in values))


def segments_for(
    labels: Mapping[str, int], regions: Sequence[Any] = (), output_values: Mapping[str, int] | None = None
) -> list[Segment]:
    """The segments of a model: one per region (objects with ``name`` and ``labels``) if there
    are any, else one per foreground label.

    ``labels`` and the regions hold training values; ``output_values`` (the plan's
    ``output_label_values``, training value -> value written in the mask, e.g. BraTS 3 -> 4)
    turns them into the values of the mask that is written.
    """

    def written(value: int) -> int:
        return int(output_values.get(str(value), value)) if output_values else int(value)

    if regions:
        return [Segment(r.name, tuple(sorted(written(v) for v in r.labels))) for r in regions]
    return [Segment(name, (written(v),)) for name, v in foreground_labels(labels).items()]


def write_dicom_seg(
    labels_zyx: np.ndarray,
    source_series: Path,
    segments: Sequence[Segment],
    output: Path,
    *,
    algorithm_name: str,
    algorithm_version: str | None = None,
    code_overrides: Mapping[str, SegmentCodes] | None = None,
    series_description: str | None = None,
) -> None:
    """Write ``labels_zyx`` (on the grid autoseg reads from ``source_series``) as a binary DICOM-SEG.

    ``algorithm_name`` names the model (e.g. ``Dataset001_BrainTumour 3d_fullres``);
    ``algorithm_version`` defaults to autoseg's version. The file is written atomically.
    """
    hd, codes = import_highdicom()
    source_series = Path(source_series)
    datasets = _source_slices(source_series, labels_zyx.shape)
    _check_segments(labels_zyx, segments, source_series)
    masks = np.stack([np.isin(labels_zyx, s.values) for s in segments], axis=-1).astype(np.uint8)
    omit_empty = bool(masks.any())  # an all-empty mask keeps its frames: a SEG needs at least one
    version = algorithm_version or _autoseg_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.DCM.ArtificialIntelligence,
        version=version,
        source="autoseg",
    )
    descriptions = [
        _segment_description(hd, number, segment, codes_for(segment.name, code_overrides), algorithm)
        for number, segment in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_series_number(datasets[0]),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="autoseg",
        manufacturer_model_name=algorithm_name[:64],
        software_versions=version,
        device_serial_number="0",
        series_description=(series_description or f"autoseg {algorithm_name}")[:64],
        content_label="AUTOSEG",
        content_description=f"autoseg prediction ({algorithm_name})"[:64],
        omit_empty_frames=omit_empty,
    )
    with atomic_path(Path(output)) as tmp:
        seg.save_as(tmp)


def _source_slices(folder: Path, shape_zyx: Sequence[int]) -> list:
    """The pydicom datasets (headers only) of the series in ``folder``, ordered as the array's slices.

    The grid is the one autoseg reads (:func:`autoseg.data.io.images.read_geometry`); each file's
    ImagePositionPatient and ImageOrientationPatient must put it exactly on one slice of it.
    """
    import pydicom
    import SimpleITK as sitk

    try:
        geometry = read_geometry(folder)
    except (OSError, ValueError) as exc:
        raise DicomSegError(f"cannot read the DICOM series {folder}: {exc}") from exc
    if tuple(shape_zyx) != tuple(geometry.shape):
        raise DicomSegError(
            f"the mask has shape {tuple(shape_zyx)} but the series {folder.name} has {tuple(geometry.shape)} (z, y, x)"
        )
    series_id = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    if not all("FrameOfReferenceUID" in ds for ds in datasets):
        raise DicomSegError(f"the series {folder.name} has no FrameOfReferenceUID: a SEG could not be placed on it")
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(geometry.origin, dtype=np.float64)
    offsets = np.asarray([_position(ds, f) for ds, f in zip(datasets, files)]) - origin
    depth = offsets @ direction[:, 2]
    order = np.argsort(depth)
    ordered = [datasets[i] for i in order]
    for k, i in enumerate(order):
        _check_slice(datasets[i], Path(files[i]).name, k, offsets[i], depth[i], direction, geometry)
    return ordered


def _position(ds, path: str) -> list[float]:
    try:
        return [float(v) for v in ds.ImagePositionPatient]
    except AttributeError as exc:
        raise DicomSegError(f"{Path(path).name} has no ImagePositionPatient") from exc


def _check_slice(ds, name: str, k: int, offset: np.ndarray, depth: float, direction: np.ndarray, geometry) -> None:
    """Refuse a file that is not exactly slice ``k`` of the grid (a wrong mask is worse than none)."""
    spacing_z, spacing_y, spacing_x = geometry.spacing
    rows, columns = int(ds.Rows), int(ds.Columns)
    if (rows, columns) != tuple(geometry.shape[1:]):
        raise DicomSegError(f"{name} has {rows}x{columns} pixels, the grid {geometry.shape[1]}x{geometry.shape[2]}")
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    if not (
        np.allclose(iop[:3], direction[:, 0], atol=DIRECTION_ATOL)
        and np.allclose(iop[3:], direction[:, 1], atol=DIRECTION_ATOL)
    ):
        raise DicomSegError(f"{name}: ImageOrientationPatient {iop.tolist()} differs from the series grid")
    in_plane = np.abs([offset @ direction[:, 0] / spacing_x, offset @ direction[:, 1] / spacing_y])
    if in_plane.max() > 0.01 or abs(depth / spacing_z - k) > 0.1:
        raise DicomSegError(f"{name}: ImagePositionPatient is not on slice {k} of the series grid")


def _check_segments(labels_zyx: np.ndarray, segments: Sequence[Segment], folder: Path) -> None:
    """Every foreground value must belong to a segment: a value left out would vanish silently."""
    if not segments:
        raise DicomSegError("a DICOM-SEG needs at least one segment")
    if not np.issubdtype(labels_zyx.dtype, np.integer):
        raise DicomSegError(f"the mask must hold integer labels, not {labels_zyx.dtype}")
    described = {v for s in segments for v in s.values}
    present = {int(v) for v in np.unique(labels_zyx)} - {0}
    if present - described:
        raise DicomSegError(
            f"the mask for {folder.name} holds label values {sorted(present - described)} "
            f"that no segment describes (segments cover {sorted(described)})"
        )


def _segment_description(hd, number: int, segment: Segment, codes: SegmentCodes, algorithm):
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=segment.name[:64],
        segmented_property_category=_coded(hd, codes.category),
        segmented_property_type=_coded(hd, codes.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def _coded(hd, code: Code):
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _series_number(source) -> int:
    """Source series number + 1000 (a SEG series of its own, listed next to its image)."""
    number = getattr(source, "SeriesNumber", None)
    return int(number) + 1000 if number not in (None, "") else 1000


def _autoseg_version() -> str:
    from autoseg.core.version import __version__

    return __version__


def import_highdicom():
    """highdicom and pydicom's code dictionary, or a one-line error naming the extra that brings them."""
    try:
        import highdicom
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise DicomSegError(f"writing DICOM-SEG needs highdicom, which is not installed: {INSTALL_HINT}") from exc
    return highdicom, codes
