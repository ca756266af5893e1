"""Each planning heuristic on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.core.errors import PlanError
from autoseg.planning.planner import (
    initial_patch,
    normalization_for,
    plan_configuration,
    plan_from_fingerprint,
    target_spacing,
    transpose_for,
)
from autoseg.planning.topology import activation_elements, derive_topology, features_per_stage


def fingerprint(spacings, shapes, channels=("MR",), relative=0.9, labels=None):
    return {
        "version": 1,
        "dataset": "toy",
        "channel_names": list(channels),
        "labels": labels or {"background": 0, "a": 1, "b": 2},
        "cases": {
            f"c{i}": {"spacing": list(sp), "shape_after_crop": list(sh)}
            for i, (sp, sh) in enumerate(zip(spacings, shapes))
        },
        "foreground_intensities": [
            {
                "mean": 50.0,
                "std": 10.0,
                "median": 50.0,
                "min": 0.0,
                "max": 100.0,
                "percentile_00_5": 5.0,
                "percentile_99_5": 95.0,
            }
        ]
        * len(channels),
        "median_relative_size_after_crop": relative,
    }


def task01_fingerprint():
    return fingerprint(
        [[1, 1, 1]] * 484,
        [[138, 169, 138]] * 484,
        channels=("FLAIR", "T1w", "T1gd", "T2w"),
        relative=0.36,
        labels={"background": 0, "edema": 1, "non-enhancing": 2, "enhancing": 3},
    )


def test_target_spacing_is_median_for_isotropic_data():
    spacings = np.array([[1.0, 0.8, 0.8], [1.2, 0.9, 0.9], [1.1, 1.0, 1.0]])
    shapes = np.array([[100, 100, 100]] * 3)
    assert target_spacing(spacings, shapes) == pytest.approx([1.1, 0.9, 0.9])


def test_target_spacing_uses_10th_percentile_on_coarse_axis():
    spacings = np.array([[s, 0.8, 0.8] for s in (2.5, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)])
    shapes = np.array([[40, 512, 512]] * 10)
    expected = float(np.percentile(spacings[:, 0], 10))
    assert target_spacing(spacings, shapes) == pytest.approx([expected, 0.8, 0.8])


def test_target_spacing_keeps_median_when_coarse_axis_is_not_short():
    spacings = np.array([[5.0, 0.8, 0.8], [2.5, 0.8, 0.8], [5.0, 0.8, 0.8]])
    shapes = np.array([[300, 512, 512]] * 3)  # 300 * 3 > 512: not a thin stack
    assert target_spacing(spacings, shapes) == pytest.approx([5.0, 0.8, 0.8])


def test_transpose_puts_coarse_axis_first():
    assert transpose_for([0.8, 0.8, 3.0]) == [2, 0, 1]
    assert transpose_for([1.0, 1.0, 1.0]) == [0, 1, 2]


def test_normalization_choice():
    stats = [{"mean": 40.0, "std": 100.0, "percentile_00_5": -900.0, "percentile_99_5": 300.0}] * 2
    ct, mr = normalization_for(["CT", "T2"], stats, median_relative_size=0.5)
    assert (ct.scheme, ct.use_mask, ct.lower, ct.upper, ct.mean, ct.std) == ("ct", False, -900.0, 300.0, 40.0, 100.0)
    assert (mr.scheme, mr.use_mask) == ("zscore", True)
    (mr_full,) = normalization_for(["T2"], stats[:1], median_relative_size=0.8)
    assert mr_full.use_mask is False


def test_topology_isotropic_128():
    topo = derive_topology([1.0, 1.0, 1.0], [128, 128, 128])
    assert topo.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert topo.kernel_sizes == [[3, 3, 3]] * 6
    assert topo.patch_size == [128, 128, 128]


def test_topology_anisotropic_uses_in_plane_kernels_until_spacing_catches_up():
    topo = derive_topology([4.0, 1.0, 1.0], [20, 160, 160])
    assert topo.kernel_sizes[0] == [1, 3, 3]
    assert topo.strides[1] == [1, 2, 2] and topo.strides[2] == [1, 2, 2]
    assert topo.strides[3] == [2, 2, 2]  # z spacing now within 2x of the pooled in-plane spacing
    assert topo.kernel_sizes[2] == [3, 3, 3]
    assert all(p % d == 0 for p, d in zip(topo.patch_size, topo.divisible_by))
    bottleneck = [p // d for p, d in zip(topo.patch_size, topo.divisible_by)]
    assert min(bottleneck) >= 4


def test_topology_pads_patch_to_total_stride():
    topo = derive_topology([1.0, 1.0, 1.0], [138, 169, 138])
    assert topo.patch_size == [160, 192, 160]


def test_activation_estimate_matches_hand_count():
    # 2-stage 2D net, patch 8x8, features 32/64, 3 classes: encoder 2*32*64 + 2*64*16,
    # decoder: 2*32*64 (convs) + 32*64 (transposed conv) + 3*64 (head)
    expected = 2 * 32 * 64 + 2 * 64 * 16 + 2 * 32 * 64 + 32 * 64 + 3 * 64
    assert activation_elements([8, 8], [[1, 1], [2, 2]], [32, 64], 3) == expected
    assert features_per_stage(7, 3) == [32, 64, 128, 256, 320, 320, 320]
    assert features_per_stage(7, 2)[-1] == 512


def test_task01_reference_plan():
    plan = plan_from_fingerprint(task01_fingerprint())
    full = plan.configurations["3d_fullres"]
    assert full.patch_size == [128, 128, 128]
    assert full.batch_size == 2
    assert full.network.n_stages == 6
    assert full.network.kernel_sizes == [[3, 3, 3]] * 6
    assert full.network.features_per_stage == [32, 64, 128, 256, 320, 320]
    assert [(n.scheme, n.use_mask) for n in full.normalization] == [("zscore", True)] * 4
    assert full.activation_estimate == 454_893_568
    assert "3d_lowres" not in plan.configurations
    assert full.batch_dice is False
    two_d = plan.configurations["2d"]
    assert (two_d.patch_size, two_d.batch_size) == ([192, 160], 105)


def test_bigger_gpu_grows_patch_and_batch():
    small = plan_from_fingerprint(task01_fingerprint(), gpu_memory_gb=8).configurations["3d_fullres"]
    big = plan_from_fingerprint(task01_fingerprint(), gpu_memory_gb=24).configurations["3d_fullres"]
    assert np.prod(big.patch_size) > np.prod(small.patch_size)
    assert big.activation_estimate / 2 * big.batch_size <= 560e6 * 3 + 1


def test_batch_size_capped_at_5_percent_of_dataset():
    config = plan_configuration(
        "3d_fullres",
        [1.0, 1.0, 1.0],
        [64, 64, 64],
        num_classes=2,
        dataset_voxels=64**3 * 3,
        gpu_memory_gb=8,
        normalization=[],
        batch_dice=False,
        data_identifier="x",
    )
    assert config.batch_size == 2  # the budget alone would allow far more


def test_large_images_get_lowres_configuration():
    fp = fingerprint([[1.0, 0.8, 0.8]] * 20, [[400, 512, 512]] * 20, channels=("CT",))
    plan = plan_from_fingerprint(fp)
    assert "3d_lowres" in plan.configurations
    low, full = plan.configurations["3d_lowres"], plan.configurations["3d_fullres"]
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing))
    assert np.prod(low.patch_size) / np.prod(low.median_shape) >= 0.25
    assert full.batch_dice is True and low.batch_dice is False


def test_2d_data_gets_no_3d_configuration():
    fp = fingerprint([[999.0, 0.5, 0.5]] * 4, [[1, 300, 300]] * 4)
    plan = plan_from_fingerprint(fp)
    assert list(plan.configurations) == ["2d"]


def test_configuration_selection_and_unknown_names():
    plan = plan_from_fingerprint(task01_fingerprint(), configurations=["2d"])
    assert list(plan.configurations) == ["2d"]
    with pytest.raises(PlanError, match="unknown configuration"):
        plan_from_fingerprint(task01_fingerprint(), configurations=["3d_huge"])


def test_initial_patch_respects_spacing_and_median():
    assert initial_patch([1.0, 1.0, 1.0], [138, 169, 138]) == [138, 169, 138]
    patch = initial_patch([4.0, 1.0, 1.0], [500, 500, 500])
    assert patch[0] < patch[1] == patch[2]


def test_requesting_a_configuration_that_does_not_apply_is_an_error():
    with pytest.raises(PlanError, match=r"\['3d_lowres'\] do not apply.*supports \['2d', '3d_fullres'\]"):
        plan_from_fingerprint(task01_fingerprint(), configurations=["3d_lowres"])
