"""Resampling images, label maps and probabilities between voxel grids.

Images use cubic splines, label maps linear interpolation of each label's mask (a
voxel takes the label whose mask exceeds 0.5; never nearest on the label grid alone),
and when one axis is much coarser than the others the in-plane resampling is done slice
by slice and the coarse axis uses nearest neighbour, so thick slices are not smeared
into each other. Pixel centres are aligned (the convention of ``skimage.transform.resize``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.core.plan import Resampling

ANISOTROPY_THRESHOLD = Resampling.anisotropy_threshold


def separate_axis(
    current: Sequence[float], target: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD
) -> int | None:
    """The axis resampled on its own, if the current or else the target spacing is anisotropic."""
    for spacing in (current, target):
        spacing = np.asarray(spacing, dtype=np.float64)
        if spacing.max() / spacing.min() > threshold:
            coarsest = np.flatnonzero(np.isclose(spacing, spacing.max()))
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def new_shape(shape: Sequence[int], current: Sequence[float], target: Sequence[float]) -> list[int]:
    return [max(1, int(round(s * c / t))) for s, c, t in zip(shape, current, target)]


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resample to ``shape`` at pixel centres; writes into ``out`` when given (no extra copy)."""
    if tuple(volume.shape) == tuple(shape):
        if out is None:
            return volume
        out[...] = volume
        return out
    if order <= 1:
        factors = [n / o for n, o in zip(shape, volume.shape)]
        result = ndimage.zoom(
            volume,
            factors,
            output=out if out is not None else volume.dtype,
            order=order,
            mode="nearest",
            grid_mode=True,
            prefilter=False,
        )
        return out if out is not None else result
    # What ndimage.zoom(grid_mode=True) computes, with the spline prefilter in float32 instead of
    # zoom's float64 copy of the whole volume: pad (edge), filter, then sample at pixel centres.
    pad = 12
    filtered = ndimage.spline_filter(
        np.pad(volume, pad, mode="edge").astype(np.float32, copy=False), order, output=np.float32, mode="mirror"
    )
    scale = np.array([o / n for o, n in zip(volume.shape, shape)])
    result = ndimage.affine_transform(
        filtered,
        scale,
        offset=0.5 * scale - 0.5 + pad,
        output_shape=tuple(shape),
        order=order,
        mode="nearest",
        prefilter=False,
        output=out if out is not None else np.float32,
    )
    return out if out is not None else result


def _nearest_along(volume: np.ndarray, axis: int, size: int, out: np.ndarray | None = None) -> np.ndarray:
    n_in = volume.shape[axis]
    index = np.clip(np.floor((np.arange(size) + 0.5) * n_in / size).astype(int), 0, n_in - 1)
    return np.take(volume, index, axis=axis, out=out, mode="clip")  # "raise" would buffer a full copy


def resample_volume(
    volume: np.ndarray,
    shape: Sequence[int],
    order: int,
    axis: int | None,
    axis_order: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample one spatial volume; ``axis`` (if set) is handled separately with ``axis_order``.

    With ``out`` the result is written there, so a caller filling a multi-channel array
    never holds a second full-size copy.
    """
    if tuple(volume.shape) == tuple(shape) or axis is None:
        return _zoom(volume, shape, order, out)
    in_plane_shape = [s for a, s in enumerate(shape) if a != axis]
    if in_plane_shape == [s for a, s in enumerate(volume.shape) if a != axis]:
        stacked = volume
    else:
        stacked = np.empty([volume.shape[axis] if a == axis else s for a, s in enumerate(shape)], volume.dtype)
        for k in range(volume.shape[axis]):
            index = (slice(None),) * axis + (k,)
            _zoom(volume[index], in_plane_shape, order, stacked[index])
    if axis_order == 0:
        return _nearest_along(stacked, axis, shape[axis], out)
    return _zoom(stacked, shape, axis_order, out)


def resample_image(
    data: np.ndarray,
    shape: Sequence[int],
    current: Sequence[float],
    target: Sequence[float],
    order: int = 3,
    axis_order: int = 0,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample a float ``(C, *spatial)`` array channel by channel to ``shape``."""
    if tuple(data.shape[1:]) == tuple(shape):
        return data
    axis = separate_axis(current, target, threshold)
    out = np.empty((data.shape[0], *shape), np.float32)
    for c, channel in enumerate(data):
        resample_volume(channel, shape, order, axis, axis_order, out=out[c])
    return out


def resample_labels(
    label: np.ndarray,
    shape: Sequence[int],
    current: Sequence[float],
    target: Sequence[float],
    order: int = 1,
    axis_order: int = 0,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample an integer label map by interpolating each label's mask (values may include -1)."""
    if tuple(label.shape) == tuple(shape):
        return label
    axis = separate_axis(current, target, threshold)
    if (
        axis is not None
        and axis_order == 0
        and all(n == o for a, (n, o) in enumerate(zip(shape, label.shape)) if a != axis)
    ):
        return _nearest_along(label, axis, shape[axis])  # only the coarse axis changes: nearest is exact
    values = np.unique(label)
    out = np.full(shape, values[0], dtype=label.dtype)
    for value in values[1:]:
        mask = resample_volume((label == value).astype(np.float32), shape, order, axis, axis_order)
        out[mask >= 0.5] = value
    return out
