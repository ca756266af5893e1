"""Temperature scaling of class probabilities, and the numbers that say how calibrated they are.

A network trained with Dice + cross-entropy is usually over-confident: of the voxels it
gives 0.99, fewer than 99 % are right. One temperature ``T`` per model, fitted on the
cross-validation predictions by minimising the negative log-likelihood, fixes most of it
(Guo et al. 2017). autoseg stores probabilities, not logits, so the temperature acts on
their logarithm, which differs from the logits by a per-voxel constant that the softmax
removes: ``softmax(log p / T)``, and ``sigmoid(logit(p) / T)`` for region (sigmoid) outputs.
Neither changes the argmax nor which side of 0.5 a region's probability lies, so **masks
are unchanged**; only the probabilities (saved, and behind the uncertainty maps) are.

Calibration is measured where it matters, near the structures: on voxels sampled from the
bounding box of the truth and the prediction (:func:`sample_voxels`), not on the millions
of easy background voxels that would make any model look calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from autoseg.data.preprocessing.cropping import bounding_box

EPS = 1e-6
#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: The temperature is searched in [1/20, 20].
LOG_T_BOUND = float(np.log(20.0))


@dataclass(frozen=True)
class Samples:
    """Probabilities ``(C, N)`` of N voxels and their truth: class indices ``(N,)`` (labels) or
    ``(C, N)`` booleans (regions, one sigmoid channel each)."""

    probabilities: np.ndarray
    truth: np.ndarray
    regions: bool

    @staticmethod
    def join(parts: list[Samples]) -> Samples:
        return Samples(
            np.concatenate([p.probabilities for p in parts], axis=1),
            np.concatenate([p.truth for p in parts], axis=-1),
            parts[0].regions,
        )


def apply_temperature(probabilities: np.ndarray, temperature: float, regions: bool) -> np.ndarray:
    """Probabilities ``(C, ...)`` re-tempered: softmax(log p / T) over C, or sigmoid(logit(p) / T) per channel."""
    p = np.clip(np.asarray(probabilities, dtype=np.float32), EPS, 1 - EPS)
    if temperature == 1.0:
        return p
    if regions:
        return 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / temperature))
    scaled = np.log(p) / temperature
    scaled -= scaled.max(axis=0, keepdims=True)
    e = np.exp(scaled)
    return e / e.sum(axis=0, keepdims=True)


def negative_log_likelihood(samples: Samples, temperature: float = 1.0) -> float:
    p = np.clip(apply_temperature(samples.probabilities, temperature, samples.regions), EPS, 1 - EPS)
    if samples.regions:
        return float(-np.mean(np.where(samples.truth, np.log(p), np.log1p(-p))))
    return float(-np.mean(np.log(np.take_along_axis(p, samples.truth[None].astype(np.int64), axis=0))))


def fit_temperature(samples: Samples) -> float:
    """The temperature minimising the negative log-likelihood of ``samples``."""
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(samples, float(np.exp(log_t))),
        bounds=(-LOG_T_BOUND, LOG_T_BOUND),
        method="bounded",
        options={"xatol": 1e-3},
    )
    return float(np.exp(result.x))


def expected_calibration_error(samples: Samples, temperature: float = 1.0, bins: int = ECE_BINS) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins.

    Labels: confidence is the top class probability, correct when it is the true class.
    Regions: each channel is a binary decision at 0.5, pooled over channels.
    """
    p = apply_temperature(samples.probabilities, temperature, samples.regions)
    if samples.regions:
        confidence = np.maximum(p, 1 - p).ravel()
        correct = ((p >= 0.5) == samples.truth).ravel()
    else:
        confidence, correct = p.max(axis=0), p.argmax(axis=0) == samples.truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.mean() * abs(float(correct[inside].mean()) - float(confidence[inside].mean()))
    return float(gap)


def brier_score(samples: Samples, temperature: float = 1.0) -> float:
    """Mean squared error of the probabilities against one-hot truth (summed over classes; per channel for regions)."""
    p = apply_temperature(samples.probabilities, temperature, samples.regions)
    if samples.regions:
        return float(np.mean((p - samples.truth) ** 2))
    one_hot = np.arange(p.shape[0])[:, None] == samples.truth[None]
    return float(np.mean(np.sum((p - one_hot) ** 2, axis=0)))


def sample_voxels(
    probabilities: np.ndarray,
    truth: np.ndarray,
    regions: list[list[int]] | None,
    predicted: np.ndarray,
    rng: np.random.Generator,
    count: int,
    margin: int = 4,
    ignore: int | None = None,
) -> Samples | None:
    """Up to ``count`` voxels drawn from the bounding box of truth and prediction (grown by ``margin``).

    ``truth`` holds consecutive labels; ``regions`` (lists of label values) turns them into one
    binary target per channel. Voxels of the ``ignore`` label are never drawn. None when both
    truth and prediction are empty.
    """
    foreground = (truth > 0) | (predicted > 0)
    if ignore is not None:
        foreground &= truth != ignore
    box = bounding_box(foreground, margin)
    if box is None:
        return None
    allowed = np.flatnonzero(truth[box] != ignore) if ignore is not None else np.arange(truth[box].size)
    chosen = rng.choice(allowed, size=min(count, allowed.size), replace=False)
    p = probabilities[(slice(None), *box)].reshape(probabilities.shape[0], -1)[:, chosen].astype(np.float32)
    t = truth[box].ravel()[chosen]
    if regions:
        return Samples(p, np.stack([np.isin(t, r) for r in regions]), True)
    return Samples(p, t.astype(np.int64), False)
