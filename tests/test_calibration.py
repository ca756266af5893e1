"""Temperature scaling: it recovers the over-confidence it is shown, lowers ECE, and never changes a mask."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.data.qc.calibration import (
    Samples,
    apply_temperature,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    sample_voxels,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def overconfident_labels(sharpening: float, n: int = 40_000, seed: int = 0) -> Samples:
    """Truth drawn from softmax(z); the 'network' reports softmax(sharpening * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (3, n))
    truth = np.array([rng.choice(3, p=p) for p in softmax(z).T])
    return Samples(softmax(sharpening * z).astype(np.float32), truth, regions=False)


def test_the_fitted_temperature_undoes_the_overconfidence_and_lowers_ece_and_brier():
    samples = overconfident_labels(3.0)
    temperature = fit_temperature(samples)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(samples, temperature) < 0.3 * expected_calibration_error(samples)
    assert brier_score(samples, temperature) < brier_score(samples)
    assert fit_temperature(overconfident_labels(1.0)) == pytest.approx(1.0, rel=0.1)  # calibrated stays put


def test_region_outputs_are_tempered_per_channel():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2.0, (2, 30_000))
    truth = rng.random(z.shape) < 1 / (1 + np.exp(-z))
    samples = Samples((1 / (1 + np.exp(-2.5 * z))).astype(np.float32), truth, regions=True)
    temperature = fit_temperature(samples)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert expected_calibration_error(samples, temperature) < expected_calibration_error(samples)


def test_temperature_never_changes_the_labels():
    rng = np.random.default_rng(2)
    p = softmax(rng.normal(0, 2, (4, 10, 12)))
    for t in (0.3, 1.7, 6.0):
        assert np.array_equal(apply_temperature(p, t, False).argmax(0), p.argmax(0))
        regions = apply_temperature(p, t, True)
        assert np.array_equal(regions >= 0.5, p >= 0.5)


def test_samples_come_from_near_the_structures_and_skip_ignored_voxels():
    truth = np.zeros((30, 30, 30), np.int64)
    truth[10:14, 10:14, 10:14] = 1
    truth[12, 12, 12] = 9  # ignore label
    probabilities = np.stack([truth == 0, truth == 1]).astype(np.float32)
    drawn = sample_voxels(probabilities, truth, None, truth, np.random.default_rng(0), 10_000, margin=2, ignore=9)
    assert drawn.probabilities.shape[1] == 8**3 - 1  # the 8-voxel box, less the ignored voxel
    assert 9 not in drawn.truth
    assert (
        sample_voxels(probabilities, np.zeros_like(truth), None, np.zeros_like(truth), np.random.default_rng(0), 100)
        is None
    )
