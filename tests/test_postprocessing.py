"""Post-processing steps: what each removes or relabels, and their inference.json form."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.core.errors import PlanError
from autoseg.data.evaluation.postprocessing import (
    LargestComponent,
    RelabelSmall,
    apply_steps,
    largest_component,
    step_from_json,
    step_to_json,
)


def two_blobs() -> np.ndarray:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[1:6, 1:6, 1:6] = 1  # 125 voxels
    labels[2:4, 2:4, 2:4] = 2  # label 2 inside the big blob
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels, separate
    labels[10, 10, 10] = 2  # touches the small blob diagonally only (26-connected)
    return labels


def test_largest_component_of_the_foreground_removes_the_small_blob_with_all_its_labels():
    labels = two_blobs()
    out = LargestComponent((1, 2)).apply(labels, (1.0, 1.0, 1.0))
    assert out[8:11, 8:11, 8:11].max() == 0
    np.testing.assert_array_equal(out[:7, :7, :7], labels[:7, :7, :7])
    assert labels[8, 8, 8] == 1  # the input is left alone


def test_largest_component_of_one_label_leaves_other_labels():
    labels = two_blobs()
    out = LargestComponent((2,)).apply(labels, (1.0, 1.0, 1.0))
    assert out[10, 10, 10] == 0 and (out[2:4, 2:4, 2:4] == 2).all()
    assert (out[8:10, 8:10, 8:10] == 1).all()


def test_ties_keep_every_largest_component_and_empty_stays_empty():
    mask = np.zeros((6, 6, 6), bool)
    mask[0, 0, 0] = mask[5, 5, 5] = True
    assert largest_component(mask).sum() == 2
    assert not largest_component(np.zeros((4, 4, 4), bool)).any()


def test_relabel_small_uses_the_volume_in_mm3():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:6, 2:6] = 2
    labels[3:5, 3:5, 3:5] = 3  # 8 voxels
    step = RelabelSmall(3, 2, max_volume_mm3=50.0)
    assert (step.apply(labels, (1.0, 1.0, 1.0)) == 3).sum() == 0  # 8 mm³ < 50: relabelled
    assert (step.apply(labels, (2.0, 2.0, 2.0)) == 3).sum() == 8  # 64 mm³: kept
    assert (apply_steps(labels, [step], (1.0, 1.0, 1.0))[3:5, 3:5, 3:5] == 2).all()


def test_steps_round_trip_through_json_and_bad_ones_are_named():
    for step in (LargestComponent((1, 2, 3)), RelabelSmall(3, 2, 100.0)):
        assert step_from_json(step_to_json(step)) == step
    with pytest.raises(PlanError, match="unknown kind 'fill_holes'"):
        step_from_json({"kind": "fill_holes"})
    with pytest.raises(PlanError, match="needs fields"):
        step_from_json({"kind": "relabel_small", "source": 3})
