"""Sliding window: bounded-memory choices must not change the answer."""

from __future__ import annotations

import pytest
import torch

from autoseg.inference import sliding_window as sw
from autoseg.inference.sliding_window import WindowSettings, predict_probabilities


class TinyNet(torch.nn.Module):
    """Position-dependent (not flip-equivariant) so mirroring mistakes show up."""

    def __init__(self, dims: int, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.body = torch.nn.Sequential(conv(2, 4, 3, padding=1), torch.nn.LeakyReLU(), conv(4, classes, 3, padding=1))
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        ramp = torch.linspace(0, 1, x.shape[-1])
        return self.body(x) + ramp


@pytest.fixture
def volume() -> torch.Tensor:
    return torch.randn(2, 20, 23, 17, generator=torch.Generator().manual_seed(1))


def test_mirror_batch_limit_changes_batches_not_results(volume):
    net = TinyNet(3).eval()
    full = predict_probabilities(net, volume, 3, WindowSettings((12, 12, 12), mirror_axes=(0, 1, 2), max_batch=8))
    assert set(net.calls) == {8}
    net.calls.clear()
    single = predict_probabilities(net, volume, 3, WindowSettings((12, 12, 12), mirror_axes=(0, 1, 2), max_batch=1))
    assert set(net.calls) == {1}
    torch.testing.assert_close(single, full, atol=1e-5, rtol=1e-5)


def test_mirroring_is_undone_exactly_for_a_flip_equivariant_network(volume):
    """A per-voxel network gives the same probabilities with and without TTA, so every flip was undone."""
    net = torch.nn.Conv3d(2, 3, 1).eval()
    plain = predict_probabilities(net, volume, 3, WindowSettings((12, 12, 12)))
    mirrored = predict_probabilities(net, volume, 3, WindowSettings((12, 12, 12), mirror_axes=(0, 1, 2), max_batch=3))
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("regions", [False, True])
def test_folds_share_one_accumulator_holding_the_mean_of_their_probabilities(volume, regions):
    a, b = TinyNet(3, seed=1).eval(), TinyNet(3, seed=2).eval()
    settings = WindowSettings((12, 12, 12), mirror_axes=(0,))
    both = predict_probabilities([a, b], volume, 3, settings, regions)
    separate = [predict_probabilities(net, volume, 3, settings, regions) for net in (a, b)]
    torch.testing.assert_close(both, (separate[0] + separate[1]) / 2, atol=1e-5, rtol=1e-5)
    assert both.min() >= 0 and both.max() <= 1
    if not regions:  # softmax: every voxel's classes sum to one
        torch.testing.assert_close(both.sum(0), torch.ones(volume.shape[1:]), atol=1e-5, rtol=0)
    # one tile, no mirroring: exactly the network's softmax (sigmoid) at that tile
    tile = volume[:, :12, :12, :12]
    single = predict_probabilities(a, tile, 3, WindowSettings((12, 12, 12)), regions)
    raw = a(tile[None])[0]
    torch.testing.assert_close(single, torch.sigmoid(raw) if regions else torch.softmax(raw, 0), atol=1e-5, rtol=0)


def test_float16_accumulator_when_the_volume_exceeds_the_budget(volume):
    net = TinyNet(3).eval()
    exact = predict_probabilities(net, volume, 3, WindowSettings((12, 12, 12)))
    budget = 3 * volume[0].numel() * 4 - 1  # float32 would need one byte more
    half = predict_probabilities(net, volume, 3, WindowSettings((12, 12, 12), accumulator_budget=budget))
    assert exact.dtype == torch.float32 and half.dtype == torch.float16
    torch.testing.assert_close(half.float(), exact, atol=2e-3, rtol=2e-3)
    assert (half.float().argmax(0) == exact.argmax(0)).float().mean() > 0.99


def test_small_volume_is_padded_and_cropped_back():
    net = TinyNet(3).eval()
    small = torch.randn(2, 5, 7, 9)
    out = predict_probabilities(net, small, 3, WindowSettings((12, 12, 12), mirror_axes=(1,)))
    assert out.shape == (3, 5, 7, 9)


def test_2d_network_over_a_volume_predicts_each_slice_on_its_own(volume):
    net = TinyNet(2).eval()
    out = predict_probabilities(net, volume, 3, WindowSettings((12, 12), mirror_axes=(0, 1), max_batch=4))
    assert out.shape == (3, 20, 23, 17)
    one_slice = predict_probabilities(net, volume[:, 7], 3, WindowSettings((12, 12), mirror_axes=(0, 1)))
    torch.testing.assert_close(out[:, 7], one_slice, atol=1e-5, rtol=1e-5)


def test_accumulator_falls_back_to_cpu_when_the_gpu_is_full(monkeypatch):
    original = torch.zeros

    def fake_zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("fake")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", fake_zeros)
    out = sw._zeros((2, 3), torch.float16, torch.device("cuda"))
    assert out.device.type == "cpu" and out.dtype == torch.float16


def test_every_tile_is_reported_for_the_progress_bar(volume):
    seen: list[tuple[int, int]] = []
    predict_probabilities(
        TinyNet(3).eval(), volume, 3, WindowSettings((12, 12, 12)), on_tile=lambda d, t: seen.append((d, t))
    )
    tiles = 3 * 3 * 2  # starts per axis: 20 -> 0, 4, 8; 23 -> 0, 6, 11; 17 -> 0, 5
    assert seen == [(i, tiles) for i in range(1, tiles + 1)]


# --------------------------------------------------------------------------- cheaper TTA


@pytest.mark.parametrize("axes", [(0, 1, 2), (0, 2), (1,), ()])
def test_passes_are_two_to_the_number_of_mirror_axes_per_tile(volume, axes):
    net, count = TinyNet(3).eval(), sw.PassCount()
    predict_probabilities(net, volume[:, :12], 3, WindowSettings((8, 12, 12), mirror_axes=axes), count=count)
    tiles = 2 * 3 * 2  # 12, 23, 17 at step 0.5 of 8, 12, 12
    assert count == sw.PassCount(
        run=tiles * 2 ** len(axes), skipped=0, tiles=tiles, mirrored_tiles=tiles if axes else 0
    )
    assert sum(net.calls) == tiles * 2 ** len(axes)


class SureWhereFaint(torch.nn.Module):
    """Background logit 4, foreground an asymmetric convolution of the image: sure of background
    where the image is faint (|conv| < 1: top probability > 0.95), unsure where it is strong;
    not flip-equivariant, so the mirrored passes change the answer in both places."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(0, 1, 27).reshape(1, 1, 3, 3, 3) / 13.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        foreground = self.conv(x)
        return torch.cat([torch.full_like(foreground, 4.0), foreground], dim=1)


def test_adaptive_tta_mirrors_only_the_unsure_tiles():
    """Two tiles that do not overlap (step 1): the faint one keeps its single pass, the strong one
    gets all eight, and each equals the plain or the full-TTA prediction exactly."""
    image = torch.rand(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    image[:, :8] *= 0.1  # tile 1: faint, sure background; tile 2: strong, unsure
    image[:, 8:] *= 20
    net = SureWhereFaint().eval()
    settings = WindowSettings((8, 8, 8), step=1.0, mirror_axes=(0, 1, 2))
    plain = predict_probabilities(net, image, 2, WindowSettings((8, 8, 8), step=1.0))
    full = predict_probabilities(net, image, 2, settings)
    count = sw.PassCount()
    adaptive = predict_probabilities(
        net, image, 2, WindowSettings((8, 8, 8), step=1.0, mirror_axes=(0, 1, 2), adaptive=0.9), count=count
    )
    assert count == sw.PassCount(run=1 + 8, skipped=7, tiles=2, mirrored_tiles=1)
    assert not torch.allclose(plain, full, atol=1e-4)  # in both tiles: mirroring matters here
    assert (plain[:, :8] - full[:, :8]).abs().max() > 1e-4 and (plain[:, 8:] - full[:, 8:]).abs().max() > 1e-4
    torch.testing.assert_close(adaptive[:, :8], plain[:, :8], atol=1e-6, rtol=0)
    torch.testing.assert_close(adaptive[:, 8:], full[:, 8:], atol=1e-6, rtol=0)


def test_adaptive_tta_blends_skipped_and_mirrored_tiles_into_a_weighted_mean():
    """Overlapping tiles of both kinds: probabilities still sum to one and lie between plain and full TTA's."""
    image = torch.rand(1, 24, 8, 8, generator=torch.Generator().manual_seed(1))
    image[:, :12] *= 0.1
    image[:, 12:] *= 20
    net = SureWhereFaint().eval()
    count = sw.PassCount()
    adaptive = predict_probabilities(
        net, image, 2, WindowSettings((8, 8, 8), mirror_axes=(0, 1, 2), adaptive=0.9), count=count
    )
    assert 0 < count.mirrored_tiles < count.tiles and count.skipped == 7 * (count.tiles - count.mirrored_tiles)
    torch.testing.assert_close(adaptive.sum(0), torch.ones(24, 8, 8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("regions", [False, True])
def test_least_confidence_is_the_least_sure_voxel(regions):
    probabilities = torch.tensor([[0.9, 0.6], [0.1, 0.4]])  # two voxels, two classes (or regions)
    assert sw.least_confidence(probabilities, regions) == pytest.approx(0.6)
