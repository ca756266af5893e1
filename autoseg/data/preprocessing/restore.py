"""Undo preprocessing: probabilities on the preprocessed grid -> a label map on the input grid.

Classes are resampled one at a time (linear, the same separate-axis rule as
preprocessing) while a running maximum keeps the winner, so memory holds two
full-resolution arrays instead of one per class. Regions are resampled one at a time,
thresholded at 0.5 and painted in the plan's order.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from autoseg.core.files import atomic_write_bytes
from autoseg.core.plan import Plan, Region, Resampling
from autoseg.data.io.datasets import remap_labels
from autoseg.data.preprocessing.pipeline import PreprocessingRecord

#: a region's voxels are those whose averaged sigmoid exceeds this.
REGION_THRESHOLD = 0.5


def _on_crop_grid(
    probabilities: torch.Tensor, record: PreprocessingRecord, resampling: Resampling
) -> Iterator[np.ndarray]:
    """Each channel resampled back to the cropped input grid, one at a time."""
    for channel in probabilities:
        yield record.to_crop_grid(channel.float().cpu().numpy(), resampling)


def paint_labels(channels: Iterable[np.ndarray], shape: Sequence[int], regions: Sequence[Region]) -> np.ndarray:
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


def probabilities_to_labels(
    probabilities: torch.Tensor, record: PreprocessingRecord, plan: Plan, resampling: Resampling
) -> np.ndarray:
    """Consecutive label map ``(z, y, x)`` in the original image's voxel grid."""
    cropped = paint_labels(_on_crop_grid(probabilities, record, resampling), record.shape_after_crop, plan.regions)
    return record.to_input_grid(cropped)


def _kept_on_input_grid(
    probabilities: torch.Tensor, record: PreprocessingRecord, plan: Plan, resampling: Resampling, out: np.ndarray
) -> Iterator[np.ndarray]:
    """The channels on the cropped grid, each also stored as float16 in ``out`` on the input grid."""
    for k, channel in enumerate(_on_crop_grid(probabilities, record, resampling)):
        fill = 1.0 if k == 0 and not plan.regions else 0.0  # background outside the crop
        out[k] = record.to_input_grid(channel.astype(np.float16), fill)
        yield channel


def probabilities_on_input_grid(
    probabilities: torch.Tensor, record: PreprocessingRecord, plan: Plan, resampling: Resampling
) -> np.ndarray:
    """float16 ``(K, z, y, x)`` probabilities in the original voxel grid (background 1 outside the crop)."""
    out = np.empty((probabilities.shape[0], *record.input_shape), np.float16)
    for _ in _kept_on_input_grid(probabilities, record, plan, resampling, out):
        pass
    return out


def labels_and_probabilities_on_input_grid(
    probabilities: torch.Tensor, record: PreprocessingRecord, plan: Plan, resampling: Resampling
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`probabilities_to_labels` and :func:`probabilities_on_input_grid` at once, resampling each class once."""
    out = np.empty((probabilities.shape[0], *record.input_shape), np.float16)
    cropped = paint_labels(
        _kept_on_input_grid(probabilities, record, plan, resampling, out), record.shape_after_crop, plan.regions
    )
    return record.to_input_grid(cropped), out


def class_names(plan: Plan) -> list[str]:
    """Names of the probability channels: the regions, else the labels (background first)."""
    return [r.name for r in plan.regions] or [n for n in plan.labels if n != "ignore"]


def write_probabilities(path: Path, probabilities: np.ndarray, plan: Plan) -> None:
    """``<case>.npz`` with float16 ``probabilities (K, z, y, x)`` and their ``classes``, written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, probabilities=probabilities.astype(np.float16, copy=False), classes=np.array(class_names(plan))
    )
    atomic_write_bytes(path, buffer.getvalue())


def to_output_values(labels: np.ndarray, plan: Plan) -> np.ndarray:
    """Consecutive training values -> the dataset's own convention (e.g. BraTS 3 -> 4)."""
    return remap_labels(labels, {int(k): v for k, v in plan.output_label_values.items()})
