"""Patch sampling: shapes, padding, foreground oversampling, DDP batch split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.core.errors import PlanError
from autoseg.training.distributed import DistributedContext, split_batch
from autoseg.training.sampling import CaseRecord, PatchSampler, forced_foreground


def make_case(tmp_path, case_id="c", shape=(20, 24, 24), tumour=((8, 10), (2, 4), (20, 22))):
    data = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    seg = np.zeros(shape, np.int8)
    seg[tuple(slice(a, b) for a, b in tumour)] = 1
    np.save(tmp_path / f"{case_id}.npy", data)
    np.save(tmp_path / f"{case_id}_seg.npy", seg)
    locations = np.argwhere(seg == 1).tolist()
    (tmp_path / f"{case_id}.json").write_text(json.dumps({"foreground_locations": {"1": locations}}))
    return CaseRecord.load(tmp_path, case_id)


def test_forced_foreground_fraction():
    assert forced_foreground(2, 0.33) == [False, True]
    assert forced_foreground(1, 0.33) == [False]
    assert sum(forced_foreground(105, 0.33)) == 35
    assert sum(forced_foreground(12, 0.33)) == 4


def test_forced_samples_contain_foreground_and_padding_is_marked(tmp_path):
    case = make_case(tmp_path)
    sampler = PatchSampler([case], [16, 16, 16], 4, forced=[True] * 4)
    np.random.seed(0)
    for _ in range(5):
        batch = next(sampler)
        assert batch["data"].shape == (4, 2, 16, 16, 16) and batch["seg"].shape == (4, 1, 16, 16, 16)
        assert all((batch["seg"][j] == 1).any() for j in range(4))


def test_patch_larger_than_image_is_padded(tmp_path):
    case = make_case(tmp_path, shape=(8, 10, 10), tumour=((2, 4), (2, 4), (2, 4)))
    batch = next(PatchSampler([case], [12, 16, 16], 1, forced=[False]))
    seg = batch["seg"][0, 0]
    assert (seg == -1).sum() == 12 * 16 * 16 - 8 * 10 * 10
    assert np.all(batch["data"][0][:, seg == -1] == 0)


def test_forced_patch_is_centred_on_foreground_in_an_image_smaller_than_the_patch(tmp_path):
    # The MSD Hippocampus case: the whole image is smaller than the patch. Forced samples must put the
    # structure at the patch centre (the image shifted around it, as nnU-Net's loader does); clamping the
    # patch into the image's bounds left every sample showing the image at the same place, so foreground
    # oversampling did nothing (docs/real-data.md).
    case = make_case(tmp_path, shape=(10, 12, 12), tumour=((7, 8), (9, 10), (8, 9)))
    sampler = PatchSampler([case], [16, 20, 16], 2, forced=[False, True])
    np.random.seed(0)
    batch = next(sampler)
    assert batch["seg"][1, 0, 8, 10, 8] == 1  # the foreground voxel at the patch centre
    # the random sample shows the image in the middle of the patch (even padding: one place only)
    assert (batch["seg"][0, 0, 3:13, 4:16, 2:14] >= 0).all() and (batch["seg"][0, 0, 3:13, 4:16, 2:14] == 1).sum() == 1
    assert batch["seg"][0, 0, 7 + 3, 9 + 4, 8 + 2] == 1


def test_forced_patch_is_held_at_the_lower_bound_only(tmp_path):
    # A voxel near the lower border cannot move the patch below the padding bound; near the upper border the
    # patch may overhang into padding (nnU-Net's rule), so the voxel stays at the centre.
    case = make_case(tmp_path, shape=(10, 12, 12), tumour=((0, 1), (11, 12), (7, 8)))
    sampler = PatchSampler([case], [16, 20, 16], 1, forced=[True])
    batch = next(sampler)
    # axis 0: start held at -3 (voxel 0 lands at 3); axis 1: centred (voxel 11 lands at 10); axis 2: centred
    assert batch["seg"][0, 0, 3, 10, 8] == 1


def test_2d_sampling_draws_slices(tmp_path):
    case = make_case(tmp_path)
    sampler = PatchSampler([case], [16, 16], 3, forced=[True] * 3)
    batch = next(sampler)
    assert batch["data"].shape == (3, 2, 16, 16)
    assert all((batch["seg"][j] == 1).any() for j in range(3))


def test_sampling_is_deterministic_under_seed(tmp_path):
    case = make_case(tmp_path)
    sampler = PatchSampler([case], [12, 12, 12], 2, forced=[False, True])
    np.random.seed(3)
    first = next(sampler)["data"]
    np.random.seed(3)
    np.testing.assert_array_equal(first, next(sampler)["data"])


def test_ddp_batch_split_covers_global_batch():
    shares = [split_batch(5, DistributedContext(rank=r, world_size=2)) for r in range(2)]
    assert shares == [(0, 3), (3, 2)]
    forced = forced_foreground(5, 0.33)
    assert sum(forced[s : s + n].count(True) for s, n in shares) == sum(forced)
    with pytest.raises(PlanError, match="smaller than the 2 processes"):
        split_batch(1, DistributedContext(rank=0, world_size=2))


def test_a_case_missing_one_of_its_files_is_reported_as_not_preprocessed(tmp_path):
    from autoseg.core.errors import WorkspaceError
    from autoseg.training.sampling import load_cases

    (tmp_path / "c1.json").write_text("{}")  # its arrays were deleted, or never finished
    (tmp_path / "c1_seg.npy").write_bytes(b"")
    with pytest.raises(WorkspaceError, match=r"1 case\(s\) are not preprocessed .*c1.*autoseg plan"):
        load_cases(tmp_path, ["c1"])
