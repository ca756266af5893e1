"""Crop to the non-zero region, the first step of fingerprinting and preprocessing.

Skull-stripped MRI and many CTs carry large zero borders; cropping them away saves
memory and time, and the (hole-filled) non-zero mask later decides which voxels the
per-image z-score normalisation sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels of ``mask`` grown by ``margin`` (clipped to the image); None if empty.

    The one bounding-box routine: cropping, evaluation, post-processing selection and
    calibration sampling all crop to it. ``np.any`` per axis, not ``np.nonzero``, so that a
    large mask costs no index arrays.
    """
    tight = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        tight.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return grow_box(tuple(tight), margin, mask.shape)


def grow_box(box: tuple[slice, ...], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels on every side, clipped to an image of ``shape``."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def nonzero_bbox(nonzero: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Crop box ``((start, stop), ...)`` of the True voxels of ``nonzero``, as the preprocessing record stores it.

    ``nonzero`` is ``np.any(data != 0, axis=0)`` of a ``(C, *spatial)`` image: voxels
    non-zero in any channel. An all-zero image keeps its full extent.
    """
    box = bounding_box(nonzero)
    if box is None:
        return tuple((0, n) for n in nonzero.shape)
    return tuple((s.start, s.stop) for s in box)


def crop(array: np.ndarray, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``box`` (a view)."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(a, b) for a, b in box)]


def fill_holes(nonzero: np.ndarray) -> np.ndarray:
    """The non-zero mask with holes filled (dark ventricles stay inside the brain)."""
    return ndimage.binary_fill_holes(nonzero)
