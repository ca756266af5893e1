"""Time nnU-Net's default augmentation in batchgenerators (v1) against batchgeneratorsv2 (v2).

Both pipelines get identical synthetic Task01-shaped batches: 2 samples x 4 channels loaded at
205³ (float32 image, int16 seg with -1 outside an ellipsoidal "brain") and augmented down to the
128³ network patch, every channel normalised over the non-zero mask (as both tools plan Task01).

- v1: the batchgenerators pipeline autoseg used before it moved to batchgeneratorsv2 (kept here,
  in :func:`v1_pipeline`, as a frozen copy of its 3D recipe), called once per batch on numpy
  arrays (what a batchgenerators augmenter worker does), ending in tensors.
- v2: ``nnUNetTrainer.get_training_transforms`` from nnunetv2 itself (no deep supervision: autoseg
  downsamples targets in the loss), called once per sample on tensors and written into a
  preallocated batch, as nnU-Net v2's ``nnUNetDataLoader.generate_train_batch`` does.

Two runs: ``forced`` (rotation and scaling on every sample, p = 1) and ``default`` (nnU-Net's
probabilities: 0.2 / 0.2). Batches of v1 and v2 alternate so that a change in background load hits
both; each library keeps its own seeded numpy / random / torch generator state across the
alternation, so each run is reproducible. Warm-up batches are not counted; v2's Gaussian-blur
FFT-or-conv benchmark (``benchmark=True``, cached per shape and kernel size, so paid once per
training) is run before timing. Single process, 1 thread, as in both tools' augmentation workers.
Only the transform call is timed (plus v2's tensor conversion and batch assembly), not the copy of
the input. Prints one JSON object.

Needs batchgenerators, batchgeneratorsv2 and nnunetv2, e.g. nnU-Net's venv::

    .bench/nnunet-venv/bin/python benchmarks/bench_augmentation_v1_v2.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoseg.training.augmentation import augmentation_params, loading_patch_size  # noqa: E402

PATCH = (128, 128, 128)
BATCH = 2
CHANNELS = 4


def phantom(shape: list[int]) -> dict[str, np.ndarray]:
    """An ellipsoidal 'brain' (-1 outside) holding a three-label tumour, noise inside, 0 outside."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in shape), indexing="ij"))
    brain = (grid**2).sum(0) < 0.9
    tumour = ((grid - 0.2) ** 2).sum(0)
    seg = np.select([tumour < 0.03, tumour < 0.08, tumour < 0.15, brain], [3, 1, 2, 0], -1).astype(np.int16)
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(BATCH, CHANNELS, *shape)).astype(np.float32) + 1) * brain
    return {"data": data, "seg": np.broadcast_to(seg, (BATCH, 1, *shape)).copy()}


def v1_pipeline(forced: bool, order_data: int = 3):
    """autoseg's former batchgenerators recipe for a 3D (not dummy-2D) patch, at strength 1."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
        GammaTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
    from batchgenerators.transforms.utility_transforms import RemoveLabelTransform, RenameTransform

    params = augmentation_params(PATCH, mask_channels=range(CHANNELS))
    if forced:
        params = dataclasses.replace(params, p_rotation=1.0, p_scale=1.0)
    spatial = SpatialTransform(
        PATCH,
        patch_center_dist_from_border=None,
        do_elastic_deform=False,
        alpha=(0, 0),
        sigma=(0, 0),
        do_rotation=True,
        angle_x=params.rotation,
        angle_y=params.rotation,
        angle_z=params.rotation,
        p_rot_per_axis=1,
        do_scale=True,
        scale=params.scale,
        border_mode_data="constant",
        border_cval_data=0,
        order_data=order_data,
        border_mode_seg="constant",
        border_cval_seg=-1,
        order_seg=1,
        random_crop=False,
        p_el_per_sample=0,
        p_scale_per_sample=params.p_scale,
        p_rot_per_sample=params.p_rotation,
        independent_scale_for_each_axis=False,
    )

    def python_random_from_numpy(**batch):  # v1's Gaussian noise draws from Python's random
        random.seed(int(np.random.randint(2**31)))
        return batch

    def zero_outside_mask(**batch):
        outside = batch["seg"][:, 0] < 0
        for c in params.mask_channels:
            batch["data"][:, c][outside] = 0
        return batch

    def to_tensors(**batch):
        batch["data"] = torch.from_numpy(np.ascontiguousarray(batch["data"], dtype=np.float32))
        batch["target"] = torch.from_numpy(np.ascontiguousarray(batch["target"], dtype=np.int16))
        return batch

    transforms = Compose(
        [
            python_random_from_numpy,
            spatial,
            GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=0.1),
            GaussianBlurTransform(
                blur_sigma=(0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5
            ),
            BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
            ContrastAugmentationTransform(contrast_range=(0.75, 1.25), p_per_sample=0.15),
            SimulateLowResolutionTransform(
                zoom_range=(0.5, 1.0),
                per_channel=True,
                p_per_channel=0.5,
                order_downsample=0,
                order_upsample=3,
                p_per_sample=0.25,
                ignore_axes=None,
            ),
            GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
            MirrorTransform(params.mirror_axes),
            zero_outside_mask,
            RemoveLabelTransform(-1, 0),
            RenameTransform("seg", "target", True),
            to_tensors,
        ]
    )

    def step(batch: dict[str, np.ndarray]) -> dict:
        return transforms(data=batch["data"], seg=batch["seg"])

    return step


def v2_pipeline(forced: bool):
    # nnunetv2 prints warnings about unset nnUNet_* paths on import: keep stdout for the JSON
    with contextlib.redirect_stdout(sys.stderr):
        from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
        from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)  # 3D, not dummy 2D (128³ is isotropic)
    transforms = nnUNetTrainer.get_training_transforms(
        PATCH, rotation, None, (0, 1, 2), False, use_mask_for_norm=[True] * CHANNELS
    )
    inner = [getattr(t, "transform", t) for t in transforms.transforms]
    spatial = next(t for t in inner if isinstance(t, SpatialTransform))
    if forced:
        spatial.p_rotation = spatial.p_scaling = 1.0
    blur = next(t for t in inner if isinstance(t, GaussianBlurTransform))
    # fill the blur's FFT-or-conv cache for the kernel sizes sigma 0.5..1 yields on 128-edge axes
    probe = torch.rand(1, *PATCH)
    for sigma in (0.5, 0.75, 1.0):
        for d in range(3):
            blur._benchmark_wrapper(probe, sigma, d)

    def step(batch: dict[str, np.ndarray]) -> dict:
        data_all = seg_all = None
        for j in range(batch["data"].shape[0]):
            out = transforms(
                image=torch.from_numpy(batch["data"][j]).float(),
                segmentation=torch.from_numpy(batch["seg"][j]).to(torch.int16),
            )
            if data_all is None:
                data_all = torch.empty((BATCH, *out["image"].shape), dtype=torch.float32)
                seg_all = torch.empty((BATCH, *out["segmentation"].shape), dtype=out["segmentation"].dtype)
            data_all[j] = out["image"]
            seg_all[j] = out["segmentation"]
        return {"data": data_all, "target": seg_all}

    return step


class Stream:
    """One library's pipeline with its own numpy / random / torch generator state."""

    def __init__(self, step, seed: int) -> None:
        self.step = step
        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        self.state = (np.random.get_state(), random.getstate(), torch.get_rng_state())
        self.times: list[float] = []

    def run(self, source: dict[str, np.ndarray], record: bool) -> dict:
        batch = {k: v.copy() for k, v in source.items()}
        np.random.set_state(self.state[0])
        random.setstate(self.state[1])
        torch.set_rng_state(self.state[2])
        start = time.perf_counter()
        out = self.step(batch)
        elapsed = time.perf_counter() - start
        self.state = (np.random.get_state(), random.getstate(), torch.get_rng_state())
        if record:
            self.times.append(elapsed)
        return out


def summary(times: list[float]) -> dict:
    return {
        "mean_s_per_batch": round(statistics.fmean(times), 3),
        "median_s_per_batch": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "batches": len(times),
    }


def measure(
    name: str, forced: bool, source: dict[str, np.ndarray], warmup: int, batches: int, seed: int, order_data: int
) -> dict:
    v1 = Stream(v1_pipeline(forced, order_data), seed)
    v2 = Stream(v2_pipeline(forced), seed)
    shapes = {}
    for i in range(warmup + batches):
        for label, stream in (("v1", v1), ("v2", v2)) if i % 2 == 0 else (("v2", v2), ("v1", v1)):
            out = stream.run(source, record=i >= warmup)
            shapes[label] = {
                "data": list(out["data"].shape),
                "target": list(out["target"].shape),
                "target_dtype": str(out["target"].dtype),
                "target_labels_last_batch": torch.unique(out["target"]).tolist(),
            }
    s1, s2 = summary(v1.times), summary(v2.times)
    return {
        "run": name,
        "p_rotation": 1.0 if forced else 0.2,
        "p_scaling": 1.0 if forced else 0.2,
        "v1_batchgenerators": s1,
        "v2_batchgeneratorsv2": s2,
        "ratio_v1_over_v2_mean": round(s1["mean_s_per_batch"] / s2["mean_s_per_batch"], 2),
        "ratio_v1_over_v2_median": round(s1["median_s_per_batch"] / s2["median_s_per_batch"], 2),
        "output_shapes": shapes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2, help="uncounted batches per library and run")
    parser.add_argument("--batches-forced", type=int, default=8, help="timed batches per library, p = 1 run")
    parser.add_argument("--batches-default", type=int, default=24, help="timed batches per library, default-p run")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads (workers use 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--v1-order-data",
        type=int,
        default=3,
        help="diagnostic: v1 image interpolation order (autoseg used 3; 1 = v2's trilinear)",
    )
    parser.add_argument("--runs", nargs="+", choices=["forced", "default"], default=["forced", "default"])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loading = loading_patch_size(PATCH, augmentation_params(PATCH))
    source = phantom(loading)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    runs = []
    with threadpool_limits(limits=args.threads), torch.no_grad():
        for name in args.runs:
            n = args.batches_forced if name == "forced" else args.batches_default
            runs.append(measure(name, name == "forced", source, args.warmup, n, args.seed, args.v1_order_data))
    from importlib.metadata import version

    print(
        json.dumps(
            {
                "patch": list(PATCH),
                "loading_patch": loading,
                "batch": BATCH,
                "channels": CHANNELS,
                "threads": args.threads,
                "v1_order_data": args.v1_order_data,
                "warmup_batches": args.warmup,
                "seed": args.seed,
                "versions": {
                    "batchgenerators": version("batchgenerators"),
                    "batchgeneratorsv2": version("batchgeneratorsv2"),
                    "torch": torch.__version__,
                    "numpy": np.__version__,
                },
                "interpolation": {
                    "v1": f"image spline order {args.v1_order_data}, seg per-label linear (order 1)",
                    "v2": "image trilinear, seg per-label trilinear argmax",
                },
                "cpu_count": os.cpu_count(),
                "load_avg_1min_start": round(load_start, 2),
                "load_avg_1min_end": round(os.getloadavg()[0], 2),
                "wall_s": round(time.perf_counter() - started, 1),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
