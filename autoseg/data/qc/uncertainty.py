"""How sure the model is, voxel by voxel and structure by structure.

Both maps are on the input grid, in [0, 1] (divided by their maximum, log K for K classes,
log 2 per region channel), so one colour scale reads every model:

* **entropy** of the averaged probabilities: high where the ensemble does not know which
  class a voxel is (total uncertainty);
* **disagreement** between the folds: the mutual information between the prediction and the
  choice of fold, ``H(mean) - mean(H(fold))`` (BALD). It is high only where the folds are each
  sure and disagree with each other, the part of the uncertainty that more training data
  would reduce.

Per structure (each label, or each region): its volume, the mean entropy inside it and in its
one-voxel boundary band, the mean fold disagreement inside it, and its **estimated Dice**: the Dice the mask
would have if the truth were drawn from the probabilities, ``2 * sum(p * m) / (sum(p) + sum(m))`` with ``m`` the
mask and ``p`` the structure's probability (Dice is not linear, so this is an estimate; for
calibrated probabilities it tracks the real Dice).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.core.plan import Plan, foreground_labels

EPS = 1e-6


def _entropy(probabilities: np.ndarray, regions: bool) -> np.ndarray:
    """Entropy per voxel in [0, 1]: over the classes, or the mean binary entropy of the region channels."""
    p = np.clip(probabilities.astype(np.float32, copy=False), EPS, 1 - EPS)
    if regions:
        binary = -(p * np.log(p) + (1 - p) * np.log1p(-p))
        return binary.mean(axis=0) / np.log(2.0)
    return -(p * np.log(p)).sum(axis=0) / np.log(p.shape[0])


def entropy_map(mean: np.ndarray, regions: bool) -> np.ndarray:
    """Normalised entropy ``(z, y, x)`` of the averaged probabilities ``(K, z, y, x)``."""
    return _entropy(mean, regions)


def disagreement_map(folds: Sequence[np.ndarray], regions: bool) -> np.ndarray:
    """Normalised mutual information between the prediction and the fold: ``H(mean) - mean(H(fold))``."""
    mean = np.mean([f.astype(np.float32) for f in folds], axis=0)
    expected = np.mean([_entropy(f, regions) for f in folds], axis=0)
    return np.clip(_entropy(mean, regions) - expected, 0.0, 1.0)


def structures_of(plan: Plan) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Structure name -> (its probability channel, the consecutive label values its mask covers): the
    regions of a region model, else the foreground labels."""
    if plan.regions:
        return {r.name: (i, tuple(r.labels)) for i, r in enumerate(plan.regions)}
    return {n: (v, (v,)) for n, v in foreground_labels(plan.labels).items()}


def estimated_dice(probability: np.ndarray, mask: np.ndarray) -> float:
    """The Dice ``mask`` would have against a truth drawn from ``probability``: 2·Σ(p·m) / (Σp + Σm)."""
    denominator = float(probability.sum(dtype=np.float64) + mask.sum())
    return 2.0 * float(probability[mask].sum(dtype=np.float64)) / denominator if denominator > 0 else 1.0


def structure_confidence(
    mean: np.ndarray,
    labels: np.ndarray,
    entropy: np.ndarray,
    disagreement: np.ndarray,
    structures: dict[str, tuple[int, Sequence[int]]],
    voxel_ml: float,
) -> dict[str, dict]:
    """Per structure: volume (ml), mean entropy inside and in the boundary band, mean fold disagreement
    inside, estimated Dice.

    ``structures``: name -> (index of its probability channel, the label values that paint it).
    """
    out = {}
    for name, (channel, values) in structures.items():
        mask = np.isin(labels, list(values))
        band = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
        out[name] = {
            "volume_ml": float(mask.sum() * voxel_ml),
            "mean_entropy": float(entropy[mask].mean()) if mask.any() else None,
            "boundary_entropy": float(entropy[band].mean()) if band.any() else None,
            "mean_disagreement": float(disagreement[mask].mean()) if mask.any() else None,
            "estimated_dice": estimated_dice(mean[channel].astype(np.float32), mask),
        }
    return out


def case_estimated_dice(structures: dict[str, dict]) -> float | None:
    """One number per case for sorting by confidence (``rank``, the review page): the mean estimated Dice of
    its structures (report.json's ``structures``); None without ``--uncertainty``."""
    values = [s["estimated_dice"] for s in structures.values() if s.get("estimated_dice") is not None]
    return float(np.mean(values)) if values else None
