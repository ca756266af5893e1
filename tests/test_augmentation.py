"""Augmentation: nnU-Net's rules, output shapes and dtypes, clean labels, reproducibility."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from autoseg.core.errors import PlanError
from autoseg.training.augmentation import (
    augmentation_params,
    augmenter,
    loading_patch_size,
    train_transforms,
    val_transforms,
)

LABELS = (0, 1, 2, 3)


def make_batch(shape: tuple[int, ...], batch: int = 2, channels: int = 2, seed: int = 0) -> dict:
    """Smooth-ish images and blocky labels 0..3, -1 outside a central box (the 'non-zero mask')."""
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(batch, channels, *shape)).astype(np.float32)
    seg = rng.integers(0, 4, size=(batch, 1, *(max(s // 4, 1) for s in shape)))
    for axis, s in enumerate(shape):
        seg = np.repeat(seg, 4, axis=axis + 2)[(slice(None),) * (axis + 2) + (slice(0, s),)]
    seg = np.pad(seg, [(0, 0), (0, 0)] + [(0, s - seg.shape[i + 2]) for i, s in enumerate(shape)])
    inside = tuple(slice(s // 8, s - s // 8) for s in shape)
    mask = np.zeros(shape, bool)
    mask[inside] = True
    seg[:, :, ~mask] = -1
    return {"data": data, "seg": seg.astype(np.int16), "keys": [f"case{i}" for i in range(batch)]}


def forced_spatial(patch: list[int]):
    """Default params with rotation and scaling always on, so interpolation is exercised."""
    return dataclasses.replace(augmentation_params(patch), p_rotation=1.0, p_scale=1.0)


class FixedLoader:
    """Deterministic loader: the same batch every time (fresh copies; transforms work in place)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.batch = make_batch(shape)

    def set_thread_id(self, thread_id: int) -> None:
        pass

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v.copy() for k, v in self.batch.items()}


class RandomLoader(FixedLoader):
    """Draws from numpy's global generator, as the patch sampler does."""

    def __next__(self) -> dict:
        return make_batch(self.batch["data"].shape[2:], seed=np.random.randint(1 << 30))


def test_rules_follow_nnunet() -> None:
    iso = augmentation_params([128, 128, 128])
    assert not iso.dummy_2d and iso.rotation == pytest.approx((-math.pi / 6, math.pi / 6))
    assert iso.mirror_axes == (0, 1, 2) and iso.p_rotation == 0.2 and iso.scale == (0.7, 1.4)
    thin = augmentation_params([20, 256, 224])
    assert thin.dummy_2d and thin.rotation == pytest.approx((-math.pi, math.pi))
    assert augmentation_params([192, 160]).rotation == pytest.approx((-math.pi, math.pi))
    assert augmentation_params([64, 512]).rotation == pytest.approx((-math.pi / 12, math.pi / 12))
    assert augmentation_params([192, 160]).mirror_axes == (0, 1)


def test_loading_patch_size() -> None:
    assert loading_patch_size([128, 128, 128], augmentation_params([128, 128, 128])) == [205, 205, 205]
    assert loading_patch_size([192, 160], augmentation_params([192, 160])) == [225, 225]  # reference 2D plan
    thin = [20, 256, 224]
    size = loading_patch_size(thin, augmentation_params(thin))
    assert size[0] == 20 and size[1] > 256 and size[2] > 224


def test_bad_input_is_named() -> None:
    with pytest.raises(PlanError, match=r"\[4, 4, 4, 4\]"):
        augmentation_params([4, 4, 4, 4])
    with pytest.raises(PlanError, match="strength"):
        augmentation_params([32, 32, 32], strength=-1)
    with pytest.raises(ValueError, match="workers"):
        augmenter(FixedLoader((8, 8)), val_transforms(), workers=-1, seed=0)


@pytest.mark.parametrize("patch", [[16, 20, 24], [24, 28], [4, 24, 20]], ids=["3d", "2d", "dummy2d"])
def test_train_shapes_dtypes_and_labels(patch: list[int]) -> None:
    params = forced_spatial(patch)
    assert params.dummy_2d == (patch == [4, 24, 20])
    loading = loading_patch_size(patch, params)
    batch = make_batch(tuple(loading))
    np.random.seed(0)
    out = train_transforms(patch, params)(**batch)
    assert set(out) == {"data", "target", "keys"}
    assert out["data"].shape == (2, 2, *patch) and out["data"].dtype == torch.float32
    assert out["target"].shape == (2, 1, *patch) and out["target"].dtype == torch.int16
    assert torch.isfinite(out["data"]).all()
    assert set(out["target"].unique().tolist()) <= set(LABELS)  # no -1, no 1.5-style blends


def test_pure_crop_keeps_the_centre() -> None:
    """Without rotation/scaling the spatial step is a centre crop, as the sampler assumes."""
    patch = [8, 8, 8]
    params = dataclasses.replace(augmentation_params(patch, strength=0.0), p_rotation=0.0, p_scale=0.0, mirror_axes=())
    batch = make_batch((12, 12, 12))
    out = train_transforms(patch, params)(**{k: v.copy() for k, v in batch.items()})
    np.testing.assert_array_equal(out["data"].numpy(), batch["data"][:, :, 2:10, 2:10, 2:10])
    np.testing.assert_array_equal(out["target"].numpy(), np.maximum(batch["seg"][:, :, 2:10, 2:10, 2:10], 0))


def test_mask_channels_are_zero_outside_the_mask() -> None:
    patch = [16, 16, 16]
    params = dataclasses.replace(forced_spatial(patch), mask_channels=(0,))
    batch = make_batch(tuple(loading_patch_size(patch, params)))
    # labels 1..3 inside, so a background voxel of the target is exactly a voxel that was -1
    batch["seg"][batch["seg"] == 0] = 1
    np.random.seed(1)
    out = train_transforms(patch, params)(**batch)
    outside = out["target"][:, 0] == 0
    assert outside.any() and (out["data"][:, 0][outside] == 0).all()
    assert (out["data"][:, 1][outside] != 0).any()  # an unmasked channel keeps its background


def test_dummy_2d_transforms_every_slice_alike() -> None:
    """Dummy 2D: one in-plane rotation per sample, shared by all slices along axis 0."""
    patch = [4, 24, 20]
    params = dataclasses.replace(forced_spatial(patch), strength=0.0, mirror_axes=())
    batch = make_batch(tuple(loading_patch_size(patch, params)))
    for key in ("data", "seg"):
        batch[key] = np.repeat(batch[key][:, :, :1], patch[0], axis=2)  # constant along axis 0
    np.random.seed(2)
    out = train_transforms(patch, params)(**{k: v.copy() for k, v in batch.items()})
    for key in ("data", "target"):
        assert (out[key] == out[key][:, :, :1]).all()
    crop = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(batch["data"].shape[2:], patch))
    assert not np.allclose(out["data"].numpy(), batch["data"][(slice(None), slice(None)) + crop])


def test_torch_generator_is_seeded_from_numpy_and_left_alone() -> None:
    """numpy's state alone decides a batch; the caller's torch stream is not disturbed."""
    patch = [12, 12, 12]
    params = dataclasses.replace(forced_spatial(patch), p_rotation=0.5)
    transforms = train_transforms(patch, params)
    batch = make_batch(tuple(loading_patch_size(patch, params)))
    outs = []
    for torch_seed in (0, 1):
        np.random.seed(5)
        torch.manual_seed(torch_seed)
        outs.append(transforms(**{k: v.copy() for k, v in batch.items()}))
        after = torch.rand(1)
        torch.manual_seed(torch_seed)
        assert torch.equal(after, torch.rand(1))
    assert torch.equal(outs[0]["data"], outs[1]["data"]) and torch.equal(outs[0]["target"], outs[1]["target"])


def test_val_transforms_only_clean_labels() -> None:
    batch = make_batch((8, 12, 10))
    out = val_transforms()(**{k: v.copy() for k, v in batch.items()})
    np.testing.assert_array_equal(out["data"].numpy(), batch["data"])
    np.testing.assert_array_equal(out["target"].numpy(), np.maximum(batch["seg"], 0))


def _first_batches(workers: int, seed: int, n: int, patch: list[int]) -> list[dict]:
    params = augmentation_params(patch)
    loader = RandomLoader(tuple(loading_patch_size(patch, params)))
    stream = augmenter(loader, train_transforms(patch, params), workers=workers, seed=seed)
    try:
        return [next(stream) for _ in range(n)]
    finally:
        if workers:
            stream._finish()


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x["data"], y["data"]) and torch.equal(x["target"], y["target"]) for x, y in zip(a, b))


def test_single_threaded_is_reproducible() -> None:
    patch = [12, 12, 12]
    first = _first_batches(0, seed=3, n=2, patch=patch)
    assert _same(first, _first_batches(0, seed=3, n=2, patch=patch))
    assert not _same(first, _first_batches(0, seed=4, n=2, patch=patch))


# Known batchgenerators race, harmless: _finish() can stop a worker while the results thread is
# still fetching a shared-memory tensor from it; that thread then dies with a traceback.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_multi_threaded_produces_reproducible_batches() -> None:
    patch = [12, 12, 12]
    first = _first_batches(2, seed=7, n=4, patch=patch)
    assert all(b["data"].shape == (2, 2, *patch) and b["target"].dtype == torch.int16 for b in first)
    assert not torch.equal(first[0]["data"], first[1]["data"])  # the two workers draw differently
    assert _same(first, _first_batches(2, seed=7, n=4, patch=patch))
