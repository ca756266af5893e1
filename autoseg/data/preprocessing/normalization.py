"""Intensity normalisation per channel, as the plan says (see :class:`Normalization`)."""

from __future__ import annotations

import numpy as np

from autoseg.core.errors import PlanError
from autoseg.core.plan import Normalization

MIN_STD = 1e-8


def normalize(data: np.ndarray, schemes: list[Normalization], mask: np.ndarray) -> np.ndarray:
    """Normalise ``(C, *spatial)`` float32 in place; ``mask`` is the filled non-zero region."""
    if len(schemes) != data.shape[0]:
        raise PlanError(f"the plan normalises {len(schemes)} channel(s) but the image has {data.shape[0]}")
    for channel, scheme in zip(data, schemes):
        _normalize_channel(channel, scheme, mask)
    return data


def _normalize_channel(x: np.ndarray, scheme: Normalization, mask: np.ndarray) -> None:
    if scheme.scheme == "zscore":
        if scheme.use_mask:
            # Statistics over the mask without copying the masked voxels out (large cases).
            if mask.any():
                mean = float(np.mean(x, where=mask, dtype=np.float64))
                std = float(np.sqrt(np.mean(np.square(x - mean, dtype=np.float32), where=mask, dtype=np.float64)))
            else:
                mean, std = 0.0, 1.0
            x -= mean
            x /= max(std, MIN_STD)
            x[~mask] = 0
        else:
            x -= x.mean()
            x /= max(float(x.std()), MIN_STD)
    elif scheme.scheme == "ct":
        np.clip(x, scheme.lower, scheme.upper, out=x)
        x -= scheme.mean
        x /= max(scheme.std, MIN_STD)
    elif scheme.scheme == "rescale":
        low, high = float(x.min()), float(x.max())
        x -= low
        x /= max(high - low, MIN_STD)
    elif scheme.scheme != "none":
        raise PlanError(f"unknown normalisation scheme {scheme.scheme!r}; known: zscore, ct, rescale, none")
