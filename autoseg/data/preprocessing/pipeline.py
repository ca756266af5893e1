"""Crop -> normalise -> resample: the one preprocessing used for training and inference.

:func:`preprocess_case` is pure (arrays in, arrays out); :func:`preprocess_dataset`
runs it over a planned dataset in parallel and stores, per case,

* ``<case>.npy``      float32 ``(C, *spatial)``, memory-mappable for fast patch reads;
* ``<case>_seg.npy``  int8/int16 labels, ``-1`` marking background outside the non-zero mask;
* ``<case>.json``     the case's :class:`PreprocessingRecord` (geometry of the original image,
  crop box, shapes: everything its inverse needs) and a sample of foreground voxel
  locations per label (for foreground oversampling).

Every file is written atomically and the JSON last, carrying a signature of the
configuration: an interrupted run resumes by skipping cases whose JSON matches, and
whose arrays match the JSON (a case whose arrays do not is preprocessed again).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.core.files import atomic_path, read_json, remove_temporaries, write_json
from autoseg.core.geometry import Geometry
from autoseg.core.parallel import WorkerPeak, parallel_map
from autoseg.core.plan import Configuration, Plan, Resampling
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.io.datasets import CaseFiles, DatasetSpec
from autoseg.data.io.images import read_channels, read_label
from autoseg.data.preprocessing.cropping import crop, fill_holes, nonzero_bbox
from autoseg.data.preprocessing.normalization import normalize
from autoseg.data.preprocessing.resampling import (
    new_shape,
    resample_image,
    resample_labels,
    resample_volume,
    separate_axis,
)

PREPROCESSED_VERSION = 2
#: Foreground voxel locations kept per label and case: plenty of distinct patch centres.
LOCATIONS_PER_LABEL = 2000
OUTSIDE_MASK = -1


@dataclass(frozen=True)
class PreprocessingRecord:
    """What preprocessing did to one case, and its inverse.

    Shapes, spacings and the crop box are in the plan's (transposed) axis order; ``geometry``
    is the input image's. :meth:`to_crop_grid` undoes the resampling of one channel and
    :meth:`to_input_grid` the crop and the transpose, so a prediction lands on the input's
    exact voxel grid.
    """

    geometry: Geometry
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]
    target_spacing: tuple[float, ...]
    shape_before_crop: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    shape_after_crop: tuple[int, ...]
    shape_after_resampling: tuple[int, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input image's shape, in its own axis order."""
        return tuple(self.shape_before_crop[a] for a in self.transpose_backward)

    def to_crop_grid(self, channel: np.ndarray, resampling: Resampling) -> np.ndarray:
        """One channel on the preprocessed grid resampled back onto the cropped input grid
        (``resampling.probabilities_order``, the same separate-axis rule as preprocessing)."""
        if tuple(channel.shape) == self.shape_after_crop:
            return channel
        axis = separate_axis(self.target_spacing, self.spacing, resampling.anisotropy_threshold)
        return resample_volume(
            channel, list(self.shape_after_crop), resampling.probabilities_order, axis, resampling.coarse_axis_order
        )

    def to_input_grid(self, cropped: np.ndarray, fill: float = 0) -> np.ndarray:
        """An array on the cropped grid placed back into the full image (``fill`` outside the crop),
        in the input's axis order."""
        full = np.full(self.shape_before_crop, fill, cropped.dtype)
        full[tuple(slice(a, b) for a, b in self.bbox)] = cropped
        return np.ascontiguousarray(full.transpose(self.transpose_backward))

    def labels_to_grid(self, labels: np.ndarray, resampling: Resampling) -> np.ndarray:
        """A label map on the input grid (a cascade's previous-stage mask) put on this case's preprocessed grid
        as preprocessing puts the training labels there: transposed, cropped to the box, resampled per label."""
        forward = [int(a) for a in np.argsort(self.transpose_backward)]
        cropped = crop(np.asarray(labels).transpose(forward), self.bbox)
        return resample_labels(
            cropped.astype(np.int8 if cropped.max(initial=0) <= np.iinfo(np.int8).max else np.int16),
            self.shape_after_resampling,
            self.spacing,
            self.target_spacing,
            resampling.label_order,
            resampling.coarse_axis_order,
            resampling.anisotropy_threshold,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "geometry": self.geometry.to_json(),
            "transpose_backward": list(self.transpose_backward),
            "spacing": list(self.spacing),
            "target_spacing": list(self.target_spacing),
            "shape_before_crop": list(self.shape_before_crop),
            "bbox": [list(b) for b in self.bbox],
            "shape_after_crop": list(self.shape_after_crop),
            "shape_after_resampling": list(self.shape_after_resampling),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessingRecord:
        return cls(
            geometry=Geometry.from_json(data["geometry"]),
            transpose_backward=tuple(int(a) for a in data["transpose_backward"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            target_spacing=tuple(float(v) for v in data["target_spacing"]),
            shape_before_crop=tuple(int(v) for v in data["shape_before_crop"]),
            bbox=tuple((int(a), int(b)) for a, b in data["bbox"]),
            shape_after_crop=tuple(int(v) for v in data["shape_after_crop"]),
            shape_after_resampling=tuple(int(v) for v in data["shape_after_resampling"]),
        )


@dataclass
class PreprocessedCase:
    data: np.ndarray
    label: np.ndarray | None
    record: PreprocessingRecord


def one_hot(labels: np.ndarray, values: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """``(len(values), *labels.shape)``: channel ``i`` is 1 where ``labels == values[i]`` (a cascade stage's
    extra input channels, from the previous stage's mask; other values, background included, are all 0)."""
    out = np.zeros((len(values), *labels.shape), dtype)
    for channel, value in zip(out, values):
        channel[labels == value] = 1
    return out


def target_spacing_for(config: Configuration, spacing_t: list[float]) -> list[float]:
    """2D configurations keep each case's own spacing across slices."""
    return list(config.spacing) if config.dims == 3 else [spacing_t[0], *config.spacing]


def preprocess_case(
    data: np.ndarray, geometry: Geometry, plan: Plan, config: Configuration, label: np.ndarray | None = None
) -> PreprocessedCase:
    """Preprocess one case given as ``(C, z, y, x)`` float32 (and consecutive labels).

    ``data`` is normalised in place where possible (no second copy of a large case);
    pass a copy if the caller still needs the raw intensities.
    """
    order = plan.transpose_forward
    data = np.asarray(data, dtype=np.float32).transpose([0] + [a + 1 for a in order])
    spacing_t = [geometry.spacing[a] for a in order]
    shape_before_crop = list(data.shape[1:])
    nonzero = np.any(data != 0, axis=0)
    box = nonzero_bbox(nonzero)
    data = np.ascontiguousarray(crop(data, box))
    mask = fill_holes(crop(nonzero, box))
    del nonzero
    normalize(data, config.normalization, mask)
    target = target_spacing_for(config, spacing_t)
    shape = new_shape(data.shape[1:], spacing_t, target)
    resampling = config.resampling
    seg = None
    if label is not None:  # labels first, so the mask is freed before the image's resampled copy exists
        seg = crop(label.transpose(order), box).astype(np.int8 if label.max() <= np.iinfo(np.int8).max else np.int16)
        seg[(seg == 0) & ~mask] = OUTSIDE_MASK
        seg = resample_labels(
            seg,
            shape,
            spacing_t,
            target,
            resampling.label_order,
            resampling.coarse_axis_order,
            resampling.anisotropy_threshold,
        )
    del mask
    shape_after_crop = list(data.shape[1:])
    data = resample_image(
        data,
        shape,
        spacing_t,
        target,
        resampling.image_order,
        resampling.coarse_axis_order,
        resampling.anisotropy_threshold,
    )
    record = PreprocessingRecord(
        geometry=geometry,
        transpose_backward=tuple(plan.transpose_backward),
        spacing=tuple(spacing_t),
        target_spacing=tuple(target),
        shape_before_crop=tuple(shape_before_crop),
        bbox=tuple(box),
        shape_after_crop=tuple(shape_after_crop),
        shape_after_resampling=tuple(shape),
    )
    return PreprocessedCase(data, seg, record)


def foreground_locations(seg: np.ndarray, case_id: str, ignore_label: int | None = None) -> dict[str, list[list[int]]]:
    """Up to LOCATIONS_PER_LABEL voxel coordinates per label (not the ignore label), fixed seed per case."""
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    locations = {}
    for value in np.unique(seg):
        if value <= 0 or value == ignore_label:
            continue
        flat = np.flatnonzero(seg == value)  # 8 bytes per hit, not 24 as np.argwhere
        if len(flat) > LOCATIONS_PER_LABEL:
            flat = np.sort(rng.choice(flat, LOCATIONS_PER_LABEL, replace=False))
        locations[str(int(value))] = np.stack(np.unravel_index(flat, seg.shape), axis=1).tolist()
    return locations


def configuration_signature(plan: Plan, config: Configuration) -> str:
    """Identity of what preprocessing produces: equal signatures mean reusable files."""
    relevant = {
        "version": PREPROCESSED_VERSION,
        "transpose": plan.transpose_forward,
        "dims": config.dims,
        "spacing": config.spacing,
        "normalization": [n.__dict__ for n in config.normalization],
        "resampling": config.resampling.__dict__,
        "labels": plan.labels,
    }
    return hashlib.blake2b(json.dumps(relevant, sort_keys=True).encode(), digest_size=12).hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a complete ``.npy`` file; None if it is unreadable or shorter than its header says."""
    try:
        array = np.load(path, mmap_mode="r")  # maps the file: a truncated one is refused, nothing is read
    except (OSError, ValueError):
        return None
    return array.shape, array.dtype


def is_done(folder: Path, case_id: str, signature: str) -> bool:
    """The case's record (written last) carries this configuration's signature and describes its arrays.

    Checking the arrays against the record (shape, type, length) catches a record whose arrays
    were replaced after it was written, e.g. by a worker of an earlier, killed run.
    """
    try:
        meta = read_json(folder / f"{case_id}.json")
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("signature") != signature:
        return False
    shape = tuple(meta.get("shape_after_resampling", ()))
    data, seg = _npy_header(folder / f"{case_id}.npy"), _npy_header(folder / f"{case_id}_seg.npy")
    return (
        data is not None
        and seg is not None
        and data[0][1:] == shape
        and data[1] == np.float32
        and seg[0] == shape
        and seg[1] in (np.int8, np.int16)
    )


def _preprocess_and_store(
    case: CaseFiles, spec: DatasetSpec, plan: Plan, config: Configuration, folder: Path, signature: str
) -> str:
    remove_temporaries(folder, [f"{case.case_id}{end}" for end in (".npy", "_seg.npy", ".json")])
    data, geometry = read_channels(case.images)
    raw_label, _ = read_label(case.label)
    result = preprocess_case(data, geometry, plan, config, spec.consecutive_labels(raw_label))
    _save_npy(folder / f"{case.case_id}.npy", result.data)
    _save_npy(folder / f"{case.case_id}_seg.npy", result.label)
    locations = foreground_locations(result.label, case.case_id, plan.labels.get("ignore"))
    meta = {
        "version": PREPROCESSED_VERSION,
        "case_id": case.case_id,
        "signature": signature,
        **result.record.to_json(),
        "foreground_locations": locations,
    }
    write_json(folder / f"{case.case_id}.json", meta)
    return case.case_id


def preprocess_dataset(
    spec: DatasetSpec,
    plan: Plan,
    config: Configuration,
    folder: Path,
    workers: int = 1,
    show_progress: bool = True,
    peak: WorkerPeak | None = None,
) -> int:
    """Preprocess every case not already done for this configuration; returns how many were done now."""
    folder.mkdir(parents=True, exist_ok=True)
    signature = configuration_signature(plan, config)
    todo = [c for c in spec.cases if not is_done(folder, c.case_id, signature)]
    work = partial(_preprocess_and_store, spec=spec, plan=plan, config=config, folder=folder, signature=signature)
    for _ in parallel_map(work, todo, workers, f"Preprocessing {config.data_identifier}", show_progress, peak):
        pass
    return len(todo)


def preprocess_configurations(
    workspace: DatasetWorkspace,
    spec: DatasetSpec,
    plan: Plan,
    workers: int = 1,
    show_progress: bool = True,
    peak: WorkerPeak | None = None,
) -> dict[str, int]:
    """Preprocess once per data identifier into the work folder: variants that only change training share their
    base's data. Returns how many cases each identifier did now."""
    done: dict[str, int] = {}
    for config in plan.configurations.values():
        if config.data_identifier not in done:
            source = plan.configurations.get(config.data_identifier, config)
            done[config.data_identifier] = preprocess_dataset(
                spec, plan, source, workspace.preprocessed(config.data_identifier), workers, show_progress, peak
            )
    return done
