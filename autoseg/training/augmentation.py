"""Training-time data augmentation: nnU-Net's default recipe, built from batchgeneratorsv2.

The sampler loads a patch larger than the network patch (:func:`loading_patch_size`) so
that rotating and scaling about its centre pulls in real image rather than padding; the
spatial transform then crops to the final patch. Intensity transforms, mirroring and the
label clean-up follow in nnU-Net's order. ``strength`` scales the intensity transforms
only, so the spatial recipe (and with it the loading patch) stays nnU-Net's.

The transforms are batchgeneratorsv2's torch implementations (measured about 5x faster per
batch than batchgenerators' numpy/scipy ones, see docs/performance.md); they work on one
sample at a time, so :func:`train_transforms` returns a small adapter that runs them over
the samples of a batch and stacks the results. batchgenerators' augmenters
(:func:`augmenter`) still run the pipeline in background processes, as in nnU-Net v2.

Batches in: ``{"data": float32 (B, C, *loading_patch), "seg": int (B, 1, *loading_patch)}``
with seg ``-1`` outside the non-zero mask or the image. Batches out:
``{"data": float32 tensor (B, C, *patch), "target": int16 tensor (B, 1, *patch)}``, ``-1``
turned into background. Other keys pass through. Every random draw derives from numpy's
global generator, which each augmenter worker seeds (:func:`augmenter`): the adapter seeds
torch's generator from it at every batch, so a run is reproducible under ``--seed``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from threadpoolctl import threadpool_limits

from autoseg.core.errors import PlanError
from autoseg.core.processes import die_with_parent
from autoseg.data.preprocessing.pipeline import OUTSIDE_MASK, one_hot
from autoseg.training.cascade import stage_steps

#: max/min patch edge above which a 3D patch is augmented slice by slice (nnU-Net's ANISO_THRESHOLD).
DUMMY_2D_THRESHOLD = 3.0
#: smallest zoom the loading patch is sized for (nnU-Net sizes it for 0.85 although scaling reaches 0.7).
LOADING_MIN_SCALE = 0.85


@dataclass(frozen=True)
class AugmentationParams:
    """The spatial recipe for one patch shape, plus how hard to push the intensity transforms."""

    rotation: tuple[float, float]
    p_rotation: float
    scale: tuple[float, float]
    p_scale: float
    dummy_2d: bool
    mirror_axes: tuple[int, ...]
    strength: float = 1.0
    #: channels normalised over the non-zero mask: zeroed again where seg is -1 after augmentation,
    #: because blur, noise and interpolation leak intensity into the background inference sees as 0.
    mask_channels: tuple[int, ...] = ()
    #: a cascade stage's: the labels of the previous stage's mask (``seg`` channel 1) that become one-hot
    #: input channels, perturbed as nnU-Net does (:mod:`autoseg.training.cascade`); empty: a first stage.
    stage_labels: tuple[int, ...] = ()


def augmentation_params(
    patch_size: Sequence[int],
    strength: float = 1.0,
    *,
    mask_channels: Sequence[int] = (),
    stage_labels: Sequence[int] = (),
) -> AugmentationParams:
    """nnU-Net's rotation, dummy-2D and mirroring rules for ``patch_size``.

    3D: ±30° about every axis, unless ``max(patch) / patch[0] > 3``: then the patch is thin
    along axis 0 and gets ±180° in-plane only ("dummy 2D"). 2D: ±180° for a near-square
    patch (max/min edge <= 1.5), else ±15°, since rotating an elongated patch a lot mostly
    brings in padding. Mirroring on every spatial axis.
    """
    patch = _check_patch(patch_size)
    if not (strength >= 0 and math.isfinite(strength)):
        raise PlanError(f"augmentation strength must be a finite number >= 0, got {strength!r}")
    dummy_2d = len(patch) == 3 and max(patch) / patch[0] > DUMMY_2D_THRESHOLD
    if len(patch) == 3:
        degrees = 180.0 if dummy_2d else 30.0
    else:
        degrees = 180.0 if max(patch) / min(patch) <= 1.5 else 15.0
    angle = math.radians(degrees)
    return AugmentationParams(
        rotation=(-angle, angle),
        p_rotation=0.2,
        scale=(0.7, 1.4),
        p_scale=0.2,
        dummy_2d=dummy_2d,
        mirror_axes=tuple(range(len(patch))),
        strength=float(strength),
        mask_channels=tuple(int(c) for c in mask_channels),
        stage_labels=tuple(int(v) for v in stage_labels),
    )


def loading_patch_size(patch_size: Sequence[int], params: AugmentationParams) -> list[int]:
    """The patch the sampler loads so that rotation and down-scaling see image, not padding.

    nnU-Net's rule, kept so patches and timings compare one to one: the patch's corner vector
    is rotated by the largest angle (capped at 90°) about each axis in turn, the element-wise
    maximum of the absolute results is divided by 0.85 and truncated. A dummy-2D patch is never
    rotated out of plane, so axis 0 keeps its size. Task01 3D: 128³ -> 205³.
    """
    patch = _check_patch(patch_size)
    angle = min(max(abs(a) for a in params.rotation), math.pi / 2)
    corner = np.asarray(patch, dtype=float)
    if len(patch) == 3:
        rotated = [rotate_coords_3d(corner, *(angle if i == axis else 0.0 for i in range(3))) for axis in range(3)]
    else:
        rotated = [rotate_coords_2d(corner, angle)]
    extent = np.max(np.abs(np.stack([corner, *rotated])), axis=0) / LOADING_MIN_SCALE
    size = [int(e) for e in extent]
    if params.dummy_2d:
        size[0] = patch[0]
    return size


def train_transforms(patch_size: Sequence[int], params: AugmentationParams) -> SampleTransforms:
    """nnU-Net's default training augmentation, cropping a loading patch to ``patch_size``.

    nnU-Net v2's ``get_training_transforms`` without deep-supervision downsampling (autoseg's
    loss does that), with the intensity probabilities and ranges scaled by ``params.strength``.
    """
    steps = _spatial_steps(_check_patch(patch_size), params) + _intensity_steps(params)
    if params.mirror_axes:
        steps.append(MirrorTransform(allowed_axes=tuple(params.mirror_axes)))
    if params.mask_channels:
        steps.append(
            MaskImageTransform(apply_to_channels=list(params.mask_channels), channel_idx_in_seg=0, set_outside_to=0)
        )
    steps.append(RemoveLabelTransform(OUTSIDE_MASK, 0))
    if params.stage_labels:
        steps += stage_steps(params.stage_labels)
    return SampleTransforms(steps)


def _spatial_steps(patch: tuple[int, ...], params: AugmentationParams) -> list[BasicTransform]:
    """Rotation and scaling (in-plane for a pseudo-2D patch), cropping the loading patch to ``patch``."""
    steps: list[BasicTransform] = []
    if params.dummy_2d:
        # slices along axis 0 become channels, so every slice of a sample shares one in-plane draw
        steps.append(Convert3DTo2DTransform())
    steps.append(
        SpatialTransform(
            patch[1:] if params.dummy_2d else patch,
            patch_center_dist_from_border=0,
            random_crop=False,
            p_elastic_deform=0,
            p_rotation=params.p_rotation,
            rotation=params.rotation,
            p_scaling=params.p_scale,
            scaling=params.scale,
            p_synchronize_scaling_across_axes=1,
            bg_style_seg_sampling=False,
            border_mode_seg="constant",
            padding_value_seg=OUTSIDE_MASK,
        )
    )
    if params.dummy_2d:
        steps.append(Convert2DTo3DTransform())
    return steps


def _intensity_steps(params: AugmentationParams) -> list[BasicTransform]:
    """Noise, blur, brightness, contrast, low resolution and gamma, their probabilities and ranges scaled by
    ``params.strength``."""
    s = params.strength
    return [
        RandomTransform(
            GaussianNoiseTransform(noise_variance=(0, 0.1 * s), p_per_channel=1, synchronize_channels=True),
            apply_probability=_p(0.1, s),
        ),
        # benchmark=False: the FFT-or-conv choice is timed per process, and the two differ in the last
        # bits, which would break reproducibility; the kernels here (sigma <= 1) favour the convolution.
        RandomTransform(
            GaussianBlurTransform(
                blur_sigma=(0.5 * s, 1.0 * s),
                synchronize_channels=False,
                synchronize_axes=False,
                p_per_channel=0.5,
                benchmark=False,
            ),
            apply_probability=_p(0.2, s),
        ),
        RandomTransform(
            MultiplicativeBrightnessTransform(
                multiplier_range=BGContrast(_factors(0.75, 1.25, s)), synchronize_channels=False, p_per_channel=1
            ),
            apply_probability=_p(0.15, s),
        ),
        RandomTransform(
            ContrastTransform(
                contrast_range=BGContrast(_factors(0.75, 1.25, s)),
                preserve_range=True,
                synchronize_channels=False,
                p_per_channel=1,
            ),
            apply_probability=_p(0.15, s),
        ),
    ] + _resolution_and_gamma_steps(params)


def _resolution_and_gamma_steps(params: AugmentationParams) -> list[BasicTransform]:
    """Low resolution and gamma (inverted, then plain), scaled by ``params.strength``."""
    s = params.strength
    return [
        RandomTransform(
            SimulateLowResolutionTransform(
                scale=_factors(0.5, 1.0, s),
                synchronize_channels=False,
                synchronize_axes=True,
                ignore_axes=(0,) if params.dummy_2d else None,
                allowed_channels=None,
                p_per_channel=0.5,
            ),
            apply_probability=_p(0.25, s),
        ),
        RandomTransform(
            GammaTransform(
                gamma=BGContrast(_factors(0.7, 1.5, s)),
                p_invert_image=1,
                synchronize_channels=False,
                p_per_channel=1,
                p_retain_stats=1,
            ),
            apply_probability=_p(0.1, s),
        ),
        RandomTransform(
            GammaTransform(
                gamma=BGContrast(_factors(0.7, 1.5, s)),
                p_invert_image=0,
                synchronize_channels=False,
                p_per_channel=1,
                p_retain_stats=1,
            ),
            apply_probability=_p(0.3, s),
        ),
    ]


def val_transforms(stage_labels: Sequence[int] = ()) -> LabelCleanup:
    """Validation batches are sampled at the final patch size: only the label clean-up (and a cascade stage's
    previous-stage mask moved into the image, one-hot, unperturbed)."""
    return LabelCleanup(tuple(stage_labels))


def augmenter(
    loader: Iterable[dict[str, Any]], transforms: Any, workers: int, seed: int, pin_memory: bool = False
) -> SingleThreadedAugmenter | MultiThreadedAugmenter:
    """Iterate ``transforms(**batch)`` over ``loader``, in ``workers`` background processes.

    ``loader`` is a batchgenerators ``SlimDataLoaderBase``/``DataLoader``-like iterator: an
    endless ``__next__`` returning batch dicts and a ``set_thread_id(i)`` (the sampler's
    :class:`~autoseg.training.sampling.PatchSampler`). Worker ``i`` reseeds numpy with
    ``seed + i`` (mod 2**32, numpy's limit) before its first batch and batches come back in
    worker order; the transforms seed torch from numpy at every batch, so a run is
    reproducible under ``--seed``. With ``workers == 0`` everything runs in this process and
    numpy's global generator is seeded with ``seed`` here, for the same reason.
    The workers die with this process, even when it is killed; still, call ``_finish()`` on a
    multi-process augmenter when done, or its workers outlive it.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = augment in the training process), got {workers}")
    if workers == 0:
        np.random.seed(seed % 2**32)
        return SingleThreadedAugmenter(loader, transforms)
    return MultiThreadedAugmenter(
        _DiesWithParent(loader, os.getpid()),
        transforms,
        num_processes=workers,
        num_cached_per_queue=2,
        seeds=[(seed + i) % 2**32 for i in range(workers)],
        pin_memory=pin_memory,
    )


class _DiesWithParent:
    """The sampler as an augmenter worker sees it: the worker's first call ties its life to the training process.

    batchgenerators' workers call ``set_thread_id`` before anything else and offer no other hook.
    """

    def __init__(self, loader: Any, parent_pid: int) -> None:
        self.loader, self.parent_pid = loader, parent_pid

    def set_thread_id(self, thread_id: int) -> None:
        die_with_parent(self.parent_pid)
        # A forked worker inherits torch's intra-op (OpenMP) pool in whatever state the parent left it: when the
        # parent had run parallel regions, the child's first multi-threaded op (a matmul of the spatial
        # transform) can wait forever for pool threads that do not exist in the child. One thread, as torch's
        # own DataLoader workers run, never enters the pool.
        torch.set_num_threads(1)
        self.loader.set_thread_id(thread_id)

    def __iter__(self) -> _DiesWithParent:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self.loader)


# --------------------------------------------------------------------------- batch adapters


class SampleTransforms:
    """Run batchgeneratorsv2 transforms sample by sample over a batchgenerators-style batch.

    Called as ``transform(**batch)`` by batchgenerators' augmenters. ``data`` and ``seg`` of
    each sample go through ``steps`` as ``image`` / ``segmentation`` tensors; the results are
    stacked into ``data`` (float32) and ``target`` (int16) tensors. Torch's generator is seeded
    from numpy's first, so numpy's state alone decides the batch, and restored afterwards, so
    augmenting in the training process (``workers == 0``) leaves its torch stream alone. As in
    nnU-Net's data loader the transforms run single-threaded and without autograd.
    """

    def __init__(self, steps: Sequence[BasicTransform]) -> None:
        self.steps = list(steps)
        self.pipeline = ComposeTransforms(self.steps)

    def __call__(self, **batch: Any) -> dict[str, Any]:
        data, seg = batch.pop("data"), batch.pop("seg")
        torch_state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(int(np.random.randint(2**63 - 1, dtype=np.int64)))
        try:
            with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
                images, labels = None, None
                for j in range(len(data)):
                    out = self.pipeline(
                        image=torch.from_numpy(np.ascontiguousarray(data[j], dtype=np.float32)),
                        segmentation=torch.from_numpy(np.ascontiguousarray(seg[j], dtype=np.int16)),
                    )
                    if images is None:
                        images = torch.empty((len(data), *out["image"].shape), dtype=torch.float32)
                        labels = torch.empty((len(data), *out["segmentation"].shape), dtype=torch.int16)
                    images[j] = out["image"]
                    labels[j] = out["segmentation"]
        finally:
            torch.set_rng_state(torch_state)
        batch["data"], batch["target"] = images, labels
        return batch


class LabelCleanup:
    """``seg`` -1 -> 0, renamed ``target``; float32 images and int16 labels as tensors. With ``stage_labels``
    (a cascade stage), ``seg``'s second channel, the previous stage's mask, joins the image one-hot.

    Tensors travel from the workers through shared memory and can be pinned.
    """

    def __init__(self, stage_labels: tuple[int, ...] = ()) -> None:
        self.stage_labels = stage_labels

    def __call__(self, **batch: Any) -> dict[str, Any]:
        seg = np.asarray(batch.pop("seg"))
        seg = np.where(seg == OUTSIDE_MASK, 0, seg).astype(np.int16)
        data = np.asarray(batch["data"], dtype=np.float32)
        if self.stage_labels:
            previous = np.stack([one_hot(sample[1], self.stage_labels) for sample in seg])
            data, seg = np.concatenate([data, previous], axis=1), seg[:, :1]
        batch["data"] = torch.from_numpy(np.ascontiguousarray(data))
        batch["target"] = torch.from_numpy(np.ascontiguousarray(seg))
        return batch


# --------------------------------------------------------------------------- helpers


def _check_patch(patch_size: Sequence[int]) -> list[int]:
    patch = [int(p) for p in patch_size]
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise PlanError(f"patch_size {list(patch_size)} is not a 2D or 3D patch of positive edges")
    return patch


def _p(probability: float, strength: float) -> float:
    return min(1.0, probability * strength)


def _factors(low: float, high: float, strength: float) -> tuple[float, float]:
    """A multiplicative range pushed away from 1 in log space: positive for any strength."""
    return low**strength, high**strength
