"""Undo preprocessing: probabilities on the preprocessed grid -> a label map on the input grid.

Classes are resampled one at a time (linear, the same separate-axis rule as
preprocessing) while a running maximum keeps the winner, so memory holds two
full-resolution arrays instead of one per class. Regions are resampled one at a time,
thresholded at 0.5 and painted in the plan's order.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from autoseg.jsonio import atomic_write_bytes
from autoseg.planning.plan import Plan, RegionSpec, Resampling
from autoseg.resampling import resample_volume, separate_axis

#: a region's voxels are those whose averaged sigmoid exceeds this.
REGION_THRESHOLD = 0.5


def _on_crop_grid(probabilities: torch.Tensor, properties: dict[str, Any],
                  resampling: Resampling) -> Iterator[np.ndarray]:
    """Each channel resampled back to the cropped input grid, one at a time."""
    shape_crop = properties["shape_after_crop"]
    axis = separate_axis(properties["target_spacing"], properties["spacing"], resampling.anisotropy_threshold)
    for channel in probabilities:
        channel = channel.float().cpu().numpy()
        if list(channel.shape) != shape_crop:
            channel = resample_volume(channel, shape_crop, resampling.probabilities_order, axis,
                                      resampling.coarse_axis_order)
        yield channel


def _uncrop(cropped: np.ndarray, properties: dict[str, Any], plan: Plan, fill: float = 0) -> np.ndarray:
    """Place a cropped array back into the full image and undo the plan's axis transpose."""
    full = np.full(properties["shape_before_crop"], fill, cropped.dtype)
    full[tuple(slice(a, b) for a, b in properties["bbox"])] = cropped
    return np.ascontiguousarray(full.transpose(plan.transpose_backward))


def paint_labels(channels: Iterable[np.ndarray], shape: Sequence[int], regions: Sequence[RegionSpec]) -> np.ndarray:
    """Consecutive labels from per-class probabilities: argmax (first class on ties), or with
    ``regions`` each region above REGION_THRESHOLD painted in order. Channels are consumed one at a time."""
    labels = np.zeros(shape, np.uint8)
    channels = iter(channels)
    if regions:
        for region, channel in zip(regions, channels):
            labels[channel > REGION_THRESHOLD] = region.paint_value
        return labels
    best = next(channels).astype(np.float32, copy=True)
    for k, channel in enumerate(channels, start=1):
        wins = channel > best
        labels[wins] = k
        best[wins] = channel[wins]
    return labels


def probabilities_to_labels(probabilities: torch.Tensor, properties: dict[str, Any], plan: Plan,
                            resampling: Resampling) -> np.ndarray:
    """Consecutive label map ``(z, y, x)`` in the original image's voxel grid."""
    cropped = paint_labels(_on_crop_grid(probabilities, properties, resampling), properties["shape_after_crop"],
                           plan.regions)
    return _uncrop(cropped, properties, plan)


def _input_grid_array(probabilities: torch.Tensor, properties: dict[str, Any], plan: Plan) -> np.ndarray:
    shape = [properties["shape_before_crop"][a] for a in plan.transpose_backward]
    return np.empty((probabilities.shape[0], *shape), np.float16)


def _kept_on_input_grid(probabilities: torch.Tensor, properties: dict[str, Any], plan: Plan,
                        resampling: Resampling, out: np.ndarray) -> Iterator[np.ndarray]:
    """The channels on the cropped grid, each also stored as float16 in ``out`` on the input grid."""
    for k, channel in enumerate(_on_crop_grid(probabilities, properties, resampling)):
        fill = 1.0 if k == 0 and not plan.regions else 0.0  # background outside the crop
        out[k] = _uncrop(channel.astype(np.float16), properties, plan, fill)
        yield channel


def probabilities_on_input_grid(probabilities: torch.Tensor, properties: dict[str, Any], plan: Plan,
                                resampling: Resampling) -> np.ndarray:
    """float16 ``(K, z, y, x)`` probabilities in the original voxel grid (background 1 outside the crop)."""
    out = _input_grid_array(probabilities, properties, plan)
    for _ in _kept_on_input_grid(probabilities, properties, plan, resampling, out):
        pass
    return out


def labels_and_probabilities_on_input_grid(probabilities: torch.Tensor, properties: dict[str, Any], plan: Plan,
                                           resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
    """:func:`probabilities_to_labels` and :func:`probabilities_on_input_grid` at once, resampling each class once."""
    out = _input_grid_array(probabilities, properties, plan)
    cropped = paint_labels(_kept_on_input_grid(probabilities, properties, plan, resampling, out),
                           properties["shape_after_crop"], plan.regions)
    return _uncrop(cropped, properties, plan), out


def class_names(plan: Plan) -> list[str]:
    """Names of the probability channels: the regions, else the labels (background first)."""
    return [r.name for r in plan.regions] or [n for n in plan.labels if n != "ignore"]


def write_probabilities(path: Path, probabilities: np.ndarray, plan: Plan) -> None:
    """``<case>.npz`` with float16 ``probabilities (K, z, y, x)`` and their ``classes``, written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=probabilities.astype(np.float16, copy=False),
                        classes=np.array(class_names(plan)))
    atomic_write_bytes(path, buffer.getvalue())


def to_output_values(labels: np.ndarray, plan: Plan) -> np.ndarray:
    """Consecutive training values -> the dataset's own convention (e.g. BraTS 3 -> 4)."""
    lookup = np.zeros(max(int(k) for k in plan.output_label_values) + 1, np.int16)
    for value, raw in plan.output_label_values.items():
        lookup[int(value)] = raw
    return lookup[labels]
