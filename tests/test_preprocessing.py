"""Crop, normalise and resample on arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.core.geometry import Geometry
from autoseg.core.plan import Normalization
from autoseg.data.preprocessing.cropping import bounding_box, fill_holes, nonzero_bbox
from autoseg.data.preprocessing.normalization import normalize
from autoseg.data.preprocessing.pipeline import foreground_locations, preprocess_case
from autoseg.data.preprocessing.resampling import resample_image, resample_labels, separate_axis
from autoseg.planning.planner import plan_from_fingerprint


def geometry(shape, spacing):
    return Geometry(tuple(shape), tuple(spacing), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def test_bbox_is_union_over_channels_and_mask_fills_holes():
    data = np.zeros((2, 10, 10, 10), np.float32)
    data[0, 2:5, 3:6, 4:7] = 1
    data[1, 6:8, 3:4, 4:5] = 1
    assert nonzero_bbox(np.any(data != 0, axis=0)) == ((2, 8), (3, 6), (4, 7))
    shell = np.zeros((1, 7, 7, 7), np.float32)
    shell[0, 1:6, 1:6, 1:6] = 1
    shell[0, 3, 3, 3] = 0  # a dark hole inside (a ventricle)
    assert fill_holes(shell[0] != 0)[3, 3, 3]


def test_bounding_box_margin_is_clipped_and_an_empty_mask_has_none_or_keeps_its_extent():
    mask = np.zeros((10, 10, 10), bool)
    mask[0:2, 4:6, 8:10] = True
    assert bounding_box(mask, margin=2) == (slice(0, 4), slice(2, 8), slice(6, 10))
    assert bounding_box(np.zeros((4, 4, 4), bool)) is None
    assert nonzero_bbox(np.zeros((4, 5, 6), bool)) == ((0, 4), (0, 5), (0, 6))


def test_masked_zscore_keeps_background_zero():
    rng = np.random.default_rng(0)
    data = np.zeros((1, 8, 8, 8), np.float32)
    data[0, 2:6, 2:6, 2:6] = rng.normal(500, 50, size=(4, 4, 4))
    mask = data[0] != 0
    normalize(data, [Normalization("zscore", use_mask=True)], mask)
    assert data[0][mask].mean() == pytest.approx(0, abs=1e-5)
    assert data[0][mask].std() == pytest.approx(1, abs=1e-4)
    assert np.all(data[0][~mask] == 0)


def test_ct_normalisation_clips_then_standardises():
    data = np.array([[[[-2000.0, 0.0, 100.0, 5000.0]]]], np.float32)
    normalize(
        data, [Normalization("ct", False, mean=50.0, std=25.0, lower=-100.0, upper=300.0)], np.ones((1, 1, 4), bool)
    )
    np.testing.assert_allclose(data.ravel(), [(-100 - 50) / 25, -2.0, 2.0, (300 - 50) / 25])


def test_separate_axis_rule():
    assert separate_axis([5.0, 1.0, 1.0], [1.0, 1.0, 1.0]) == 0
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 4.0, 1.0]) == 1
    assert separate_axis([1.0, 1.2, 1.0], [1.5, 1.5, 1.5]) is None


def test_label_resampling_preserves_volume_and_values():
    label = np.zeros((20, 20, 20), np.int16)
    label[5:15, 5:15, 5:15] = 2
    label[8:12, 8:12, 8:12] = 1
    out = resample_labels(label, (40, 40, 40), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out > 0).sum() * 0.125 == pytest.approx((label > 0).sum(), rel=0.05)


def test_anisotropic_resampling_uses_nearest_across_slices():
    data = np.zeros((1, 4, 6, 6), np.float32)
    for k in range(4):
        data[0, k] = k + 1  # one constant value per thick slice
    out = resample_image(data, (8, 6, 6), (4.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    assert set(np.unique(out)) == {1.0, 2.0, 3.0, 4.0}  # no blend between slices


def _toy_plan(spacing, n_channels=1, relative=0.5):
    fp = {
        "version": 1,
        "dataset": "toy",
        "channel_names": ["MR"] * n_channels,
        "labels": {"background": 0, "tumour": 1},
        "cases": {"a": {"spacing": list(spacing), "shape_after_crop": [20, 40, 40]}},
        "foreground_intensities": [{"mean": 0.0, "std": 1.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0}]
        * n_channels,
        "median_relative_size_after_crop": relative,
    }
    return plan_from_fingerprint(fp)


def test_preprocess_case_crops_normalises_resamples_and_marks_outside():
    rng = np.random.default_rng(0)
    data = np.zeros((1, 24, 30, 30), np.float32)
    data[0, 2:22, 5:25, 5:25] = rng.normal(300, 30, size=(20, 20, 20))
    label = np.zeros((24, 30, 30), np.int16)
    label[8:14, 10:20, 10:20] = 1
    plan = _toy_plan([2.0, 1.0, 1.0])
    config = plan.configurations["3d_fullres"]
    # The case arrives at a coarser in-plane spacing than the plan's target of 1 mm.
    result = preprocess_case(data, geometry(data.shape[1:], (2.0, 1.5, 1.5)), plan, config, label)
    assert result.record.bbox == ((2, 22), (5, 25), (5, 25))
    assert result.record.shape_after_crop == (20, 20, 20)
    assert result.data.shape == (1, 20, 30, 30) == (1, *result.record.shape_after_resampling)
    assert result.label.shape == result.data.shape[1:]
    assert set(np.unique(result.label)) <= {-1, 0, 1}
    inside = result.label >= 0
    assert abs(float(result.data[0][inside].mean())) < 0.1
    tumour_ml = (result.label == 1).sum() * 2.0 * 1.0 * 1.0
    assert tumour_ml == pytest.approx((label == 1).sum() * 2.0 * 1.5 * 1.5, rel=0.15)


@pytest.mark.parametrize("case_spacing", [(1.0, 1.0, 3.0), (0.8, 1.1, 2.5)], ids=["on-target", "resampled"])
def test_the_record_undoes_crop_transpose_and_resampling(case_spacing):
    """A label taken through preprocessing and back by its record lands on the input grid, in the input's axes."""
    import json

    import torch

    from autoseg.data.preprocessing.pipeline import PreprocessingRecord
    from autoseg.data.preprocessing.restore import probabilities_to_labels

    fp = {
        "version": 1,
        "dataset": "toy",
        "channel_names": ["MR"],
        "labels": {"background": 0, "tumour": 1},
        "cases": {"a": {"spacing": [1.0, 1.0, 3.0], "shape_after_crop": [40, 40, 12]}},
        "foreground_intensities": [{"mean": 0.0, "std": 1.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0}],
        "median_relative_size_after_crop": 0.5,
    }
    plan = plan_from_fingerprint(fp)
    assert plan.transpose_forward == [2, 0, 1]  # the coarse axis goes first: the inverse must put it back
    data = np.zeros((1, 34, 30, 14), np.float32)
    data[0, 3:30, 4:27, 2:12] = 100 + np.random.default_rng(0).normal(0, 5, (27, 23, 10))
    label = np.zeros((34, 30, 14), np.int16)
    label[8:22, 10:20, 4:9] = 1
    config = plan.configurations["3d_fullres"]
    result = preprocess_case(data, geometry(data.shape[1:], case_spacing), plan, config, label)
    record = result.record
    assert PreprocessingRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert record.input_shape == label.shape
    one_hot = torch.from_numpy(np.stack([result.label <= 0, result.label == 1]).astype(np.float32))
    restored = probabilities_to_labels(one_hot, record, plan, config.resampling)
    assert restored.shape == label.shape
    if case_spacing == (1.0, 1.0, 3.0):
        np.testing.assert_array_equal(restored, label)
    else:
        overlap = 2 * np.sum((restored == 1) & (label == 1)) / (np.sum(restored == 1) + np.sum(label == 1))
        assert overlap > 0.9


def test_preprocess_case_without_label_is_the_inference_path():
    data = np.random.default_rng(1).random((1, 10, 12, 12)).astype(np.float32) + 1
    plan = _toy_plan([1.0, 1.0, 1.0], relative=1.0)
    with_label = preprocess_case(
        data.copy(),
        geometry((10, 12, 12), (1, 1, 1)),
        plan,
        plan.configurations["3d_fullres"],
        np.zeros((10, 12, 12), np.int16),
    )
    without = preprocess_case(data, geometry((10, 12, 12), (1, 1, 1)), plan, plan.configurations["3d_fullres"])
    assert without.label is None
    np.testing.assert_array_equal(with_label.data, without.data)


def test_foreground_locations_point_at_their_label():
    seg = np.zeros((30, 30, 30), np.int8)
    seg[:20] = 1
    seg[25:, :5, :5] = 2
    locations = foreground_locations(seg, "case")
    assert len(locations["1"]) == 2000 and len(locations["2"]) == 125
    for value, coords in locations.items():
        coords = np.asarray(coords)
        assert np.all(seg[tuple(coords.T)] == int(value))
    assert foreground_locations(seg, "case") == locations  # fixed seed
