"""Crop to the non-zero region, the first step of fingerprinting and preprocessing.

Skull-stripped MRI and many CTs carry large zero borders; cropping them away saves
memory and time, and the (hole-filled) non-zero mask later decides which voxels the
per-image z-score normalisation sees.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_bbox(nonzero: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box ``((start, stop), ...)`` of the True voxels of ``nonzero``.

    ``nonzero`` is ``np.any(data != 0, axis=0)`` of a ``(C, *spatial)`` image: voxels
    non-zero in any channel. An all-zero image keeps its full extent.
    """
    box = []
    for axis in range(nonzero.ndim):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        hits = np.flatnonzero(np.any(nonzero, axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, nonzero.shape[axis]))
    return tuple(box)


def crop(array: np.ndarray, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` to ``box`` (a view)."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(a, b) for a, b in box)]


def fill_holes(nonzero: np.ndarray) -> np.ndarray:
    """The non-zero mask with holes filled (dark ventricles stay inside the brain)."""
    return ndimage.binary_fill_holes(nonzero)
