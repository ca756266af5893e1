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
    predict_probabilities(TinyNet(3).eval(), volume, 3, WindowSettings((12, 12, 12)), on_tile=lambda d, t: seen.append((d, t)))
    tiles = 3 * 3 * 2  # starts per axis: 20 -> 0, 4, 8; 23 -> 0, 6, 11; 17 -> 0, 5
    assert seen == [(i, tiles) for i in range(1, tiles + 1)]
