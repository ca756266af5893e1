"""Sliding-window prediction over a preprocessed volume, with bounded memory.

Tiles overlap by ``1 - step`` of the patch and are blended with a Gaussian importance
map (sigma = patch / 8) so tile borders, where the network sees least context, count
least. Mirror test-time augmentation flips each tile along every subset of the mirror
axes (``2^len(axes)`` passes; fewer axes, fewer passes). Adaptive TTA (``WindowSettings.adaptive``)
runs each tile's identity pass first and the mirrored ones only where that pass is unsure
somewhere in the tile (:func:`least_confidence` below the threshold); a tile that skips them
contributes its one pass, so the blend stays a Gaussian-weighted mean of per-tile means.
:class:`PassCount` counts the passes run and skipped. The flipped copies go through the network in batches of
at most ``max_batch``
(on a CPU one copy of a Task01-size patch already takes ~1.9 GB of activations, so the
Predictor sizes the batch from its memory budget; on CUDA an out-of-memory error halves
the batch and retries). Every network output (each mirrored copy, each fold) becomes
probabilities at once (softmax over classes, or sigmoid per region), and those are averaged:
the ensemble is the mean of the folds' probabilities. All of them go into ONE accumulator,
so memory holds one ``(K, *spatial)`` array whatever the number of folds; it is float16
when a float32 one would exceed the budget (a 512x512x500 CT with 15 classes: 7.9 GB in
float32, 3.9 GB in float16), and on CUDA it lives on the GPU unless the GPU is short of
memory, then on the CPU. The accumulator always holds the running Gaussian-weighted MEAN,
updated in float32 tile by tile (``mean += (tile - mean) * w / W``): a float16 sum of
weighted values would underflow where the weights are ~1e-11 at the tile corners, a
running mean stays in [0, 1].

With ``WindowSettings.average_logits`` (a model imported from nnU-Net, which averages that way) the
network outputs are averaged as logits over mirrors, models and tiles, and turned into probabilities once,
at the end: nnU-Net's arithmetic, so the imported model's masks are nnU-Net's.

2D configurations treat a volume as a stack of slices: the window is ``(1, py, px)`` and
the slice axis is squeezed before the network.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)
SIGMA_SCALE = 1 / 8
GIB = 1024**3


@dataclass(frozen=True)
class WindowSettings:
    """How to slide: the network's patch, overlap, mirror axes (of the patch), precision, batch limit,
    and ``adaptive``: None (every tile mirrored), or the confidence below which a tile's mirrors run.
    ``average_logits``: average the outputs before the softmax/sigmoid instead of after (nnU-Net's way)."""

    patch: tuple[int, ...]
    step: float = 0.5
    mirror_axes: tuple[int, ...] = ()
    autocast_dtype: torch.dtype | None = None
    max_batch: int = 8
    accumulator_budget: int = 2 * GIB
    adaptive: float | None = None
    average_logits: bool = False
    #: ``analytic``: autoseg's Gaussian; ``nnunet``: nnU-Net's (an impulse at ``patch // 2`` filtered by
    #: scipy, stored in float16), for an imported model's exact blending weights.
    gaussian: str = "analytic"


def output_probabilities(logits: torch.Tensor, regions: bool, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` (sigmoid per region)."""
    return torch.sigmoid(logits) if regions else torch.softmax(logits, dim=dim)


@dataclass
class PassCount:
    """Network passes (one copy of one tile through one model) run and skipped by adaptive TTA, and the
    tiles (per model) with and without their mirrored passes."""

    run: int = 0
    skipped: int = 0
    tiles: int = 0
    mirrored_tiles: int = 0

    def add(self, variants: int, ran: int, models: int) -> None:
        """One tile through ``models``: ``ran`` of its ``variants`` copies went through each."""
        self.run += ran * models
        self.skipped += (variants - ran) * models
        self.tiles += models
        self.mirrored_tiles += models if ran > 1 else 0

    def __sub__(self, other: PassCount) -> PassCount:
        return PassCount(*(getattr(self, k) - getattr(other, k) for k in ("run", "skipped", "tiles", "mirrored_tiles")))

    def __add__(self, other: PassCount) -> PassCount:
        return PassCount(*(getattr(self, k) + getattr(other, k) for k in ("run", "skipped", "tiles", "mirrored_tiles")))


def gaussian_importance(patch: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Separable Gaussian, 1 at the centre, never exactly 0 (every voxel gets some weight)."""
    weights = None
    for size in patch:
        x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-0.5 * (x / max(size * SIGMA_SCALE, 1e-3)) ** 2)
        weights = g if weights is None else weights[..., None] * g
    weights = weights / weights.max()
    return weights.clamp_min(weights[weights > 0].min()).to(device)


def nnunet_gaussian(patch: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """nnU-Net's importance map (``compute_gaussian``): an impulse at ``patch // 2`` through
    ``scipy.ndimage.gaussian_filter`` (sigma = patch / 8, zero outside), scaled to 10, rounded to float16,
    zeros replaced by the smallest weight; returned as float32 scaled to 1 (the blend divides the scale out)."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(impulse, [p * SIGMA_SCALE for p in patch], 0, mode="constant", cval=0)
    half = torch.from_numpy(weights / (weights.max() / 10)).to(torch.float16)
    half[half == 0] = half[half != 0].min()
    return (half.float() / 10).to(device)


def tile_starts(shape: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """Start offsets per axis so tiles of ``patch`` cover ``shape`` with the requested overlap."""
    starts = []
    for size, p in zip(shape, patch):
        if size <= p:
            starts.append([0])
            continue
        n = math.ceil((size - p) / (p * step)) + 1
        starts.append([int(round(i * (size - p) / (n - 1))) for i in range(n)])
    return starts


def mirror_variants(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (8 for three axes), the identity first."""
    return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]


def accumulator_dtype(num_classes: int, spatial: Sequence[int], budget: int) -> torch.dtype:
    """float32 when the accumulator fits the budget, else float16 (half the memory)."""
    return torch.float32 if num_classes * math.prod(spatial) * 4 <= budget else torch.float16


def _zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate on ``device``; a GPU short of memory falls back to the CPU."""
    if device.type == "cuda":
        try:
            return torch.zeros(shape, dtype=dtype, device=device)
        except torch.cuda.OutOfMemoryError:
            log.warning("GPU memory too small for a %s accumulator; accumulating on the CPU", list(shape))
            torch.cuda.empty_cache()
    return torch.zeros(shape, dtype=dtype)


class _BatchedForward:
    """Runs flipped copies of a tile through a network in batches, halving the batch on CUDA OOM."""

    def __init__(self, settings: WindowSettings, device: torch.device, squeeze_axis: int | None, regions: bool) -> None:
        self.settings = settings
        self.device = device
        self.squeeze_axis = squeeze_axis
        self.regions = regions
        self.max_batch = max(1, settings.max_batch)

    def __call__(self, model: torch.nn.Module, tile: torch.Tensor, variants: list[tuple[int, ...]]) -> torch.Tensor:
        """Sum over ``variants`` (axes of the batch) of the un-flipped float32 probabilities, ``(K, *window)``."""
        total = None
        index = 0
        while index < len(variants):
            chunk = variants[index : index + self.max_batch]
            try:
                out = self._forward(model, tile, chunk)
            except torch.cuda.OutOfMemoryError:
                if self.max_batch == 1:
                    raise
                self.max_batch //= 2
                torch.cuda.empty_cache()
                log.warning("GPU out of memory; mirrored copies now go %d at a time", self.max_batch)
                continue
            total = out if total is None else total.add_(out)
            index += len(chunk)
        return total

    def _forward(self, model: torch.nn.Module, tile: torch.Tensor, chunk: list[tuple[int, ...]]) -> torch.Tensor:
        batch = torch.cat([tile.flip(v) if v else tile for v in chunk])
        if self.squeeze_axis is not None:
            batch = batch.squeeze(self.squeeze_axis)
        dtype = self.settings.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch).float()
        if not self.settings.average_logits:
            out = output_probabilities(out, self.regions, dim=1)
        if self.squeeze_axis is not None:
            out = out.unsqueeze(self.squeeze_axis)
        return sum(out[i].flip([a - 1 for a in v]) if v else out[i] for i, v in enumerate(chunk))


def least_confidence(probabilities: torch.Tensor, regions: bool) -> float:
    """How sure the least sure voxel of ``(K, *window)`` probabilities is: its top class probability
    (softmax), or for regions the smallest ``max(p, 1 - p)`` of any region."""
    if regions:
        return float(1 - torch.minimum(probabilities, 1 - probabilities).max())
    return float(probabilities.max(dim=0).values.min())


def as_probabilities(output: torch.Tensor, settings: WindowSettings, regions: bool) -> torch.Tensor:
    """Probabilities of an output averaged as ``settings`` average: with ``average_logits`` the softmax (sigmoid
    for regions) of the averaged logits, in the output's dtype; else the output itself."""
    if not settings.average_logits:
        return output
    return output_probabilities(output.float(), regions, dim=0).to(output.dtype)


def _tile_mean(
    models: Sequence[torch.nn.Module],
    forward: _BatchedForward,
    tile: torch.Tensor,
    variants: list[tuple[int, ...]],
    count: PassCount,
) -> torch.Tensor:
    """The tile's probabilities averaged over models and the mirrors it runs: all of them, or with
    ``adaptive`` the identity pass alone when its least sure voxel is at least that confident."""
    adaptive = forward.settings.adaptive
    ran = variants if adaptive is None else variants[:1]
    summed = None
    for model in models:
        out = forward(model, tile, ran)
        summed = out if summed is None else summed.add_(out)
    if (
        len(ran) < len(variants)
        and least_confidence(as_probabilities(summed / len(models), forward.settings, forward.regions), forward.regions)
        < adaptive
    ):
        ran = variants
        for model in models:
            summed.add_(forward(model, tile, variants[1:]))
    count.add(len(variants), len(ran), len(models))
    return summed.mul_(1.0 / (len(ran) * len(models)))


@torch.inference_mode()
def predict_probabilities(
    models: torch.nn.Module | Sequence[torch.nn.Module],
    data: torch.Tensor,
    num_classes: int,
    settings: WindowSettings,
    regions: bool = False,
    device: torch.device | str = "cpu",
    on_tile: Callable[[int, int], None] | None = None,
    count: PassCount | None = None,
    keep_logits: bool = False,
) -> torch.Tensor:
    """Probabilities ``(K, *spatial)`` for a ``(C, *spatial)`` volume: softmax (``regions``: sigmoid per
    region) of every output, averaged over mirrors and models, blended over tiles (Gaussian).

    The result is float32 or float16 (see :func:`accumulator_dtype`), on ``device`` when it fits there.
    ``on_tile(done, total)`` is called after every tile (progress of a long case); ``count``, when
    given, adds up the network passes run and skipped. ``settings.average_logits`` averages logits and applies
    the softmax once, at the end; ``keep_logits`` then returns the logits (e.g. folds run apart, averaged later).
    """
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    device = torch.device(device)
    patch = list(settings.patch)
    mirror = list(settings.mirror_axes)
    squeeze_axis = None
    if len(patch) == 2 and data.ndim == 4:  # a 2D network over a volume: windows one slice thick
        patch, mirror, squeeze_axis = [1, *patch], [a + 1 for a in mirror], 2
    spatial = list(data.shape[1:])
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    pad_before = [(p - s) // 2 for p, s in zip(padded, spatial)]
    inner = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    if padded != spatial:
        canvas = data.new_zeros((data.shape[0], *padded))
        canvas[(slice(None),) + inner] = data
        data = canvas
    weights = (nnunet_gaussian if settings.gaussian == "nnunet" else gaussian_importance)(patch, device)
    dtype = accumulator_dtype(num_classes, padded, settings.accumulator_budget)
    accumulated = _zeros((num_classes, *padded), dtype, device)
    coverage = _zeros(padded, torch.float32, accumulated.device)
    forward = _BatchedForward(settings, device, squeeze_axis, regions)
    variants = mirror_variants([a + 2 for a in mirror])  # axes of a (N, C, *window) batch
    count = count if count is not None else PassCount()
    starts = list(itertools.product(*tile_starts(padded, patch, settings.step)))
    for done, start in enumerate(starts, start=1):
        window = tuple(slice(s, s + p) for s, p in zip(start, patch))
        tile = data[(slice(None),) + window].to(device, non_blocking=True)[None]
        tile_mean = _tile_mean(models, forward, tile, variants, count)
        tile_weights = weights.to(coverage.device)
        covered = coverage[window]
        covered += tile_weights
        mean = accumulated[(slice(None),) + window]
        current = mean.float()
        current += (tile_mean.to(current.device) - current) * (tile_weights / covered)
        mean.copy_(current)
        if on_tile is not None:
            on_tile(done, len(starts))
    if padded != spatial:
        accumulated = accumulated[(slice(None),) + inner]
    return accumulated if keep_logits else as_probabilities(accumulated, settings, regions)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
