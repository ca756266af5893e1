"""Benchmark the training augmentation pipeline on the Task01 3D plan shape.

Batch 2 x 4 channels, loaded at 205³ and augmented down to 128³ with nnU-Net's default
recipe, through :func:`autoseg.training.augmentation.augmenter` with 1 and 2 worker
processes. The loader hands out copies of one in-memory brain phantom, so disk reads are
left out and the number is the augmentation (plus transfer) throughput. The first batches,
one per worker, are the warm-up and are not counted. Prints one JSON object.

    python benchmarks/bench_loader.py --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from autoseg.training.augmentation import augmentation_params, augmenter, loading_patch_size, train_transforms

PATCH = [128, 128, 128]
BATCH = 2
CHANNELS = 4


class PhantomLoader:
    """Endless copies of one batch: an ellipsoidal 'brain' (-1 outside) holding a three-label tumour."""

    def __init__(self, shape: list[int]) -> None:
        grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij"))
        brain = (grid**2).sum(0) < 0.9
        tumour = ((grid - 0.2) ** 2).sum(0)
        seg = np.select([tumour < 0.03, tumour < 0.08, tumour < 0.15, brain], [3, 1, 2, 0], -1).astype(np.int16)
        rng = np.random.default_rng(0)
        data = rng.normal(size=(BATCH, CHANNELS, *shape)).astype(np.float32) * brain
        self.batch = {"data": data, "seg": np.broadcast_to(seg, (BATCH, 1, *shape)).copy()}

    def set_thread_id(self, thread_id: int) -> None:
        pass

    def __iter__(self) -> PhantomLoader:
        return self

    def __next__(self) -> dict:
        return {k: v.copy() for k, v in self.batch.items()}


def measure(loader: PhantomLoader, workers: int, seconds: float) -> dict:
    params = augmentation_params(PATCH)
    stream = augmenter(loader, train_transforms(PATCH, params), workers=workers, seed=1)
    try:
        for _ in range(max(workers, 1)):
            next(stream)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(stream)
            count += 1
        elapsed = time.perf_counter() - start
    finally:
        if workers:
            stream._finish()
    return {
        "workers": workers,
        "batches": count,
        "seconds": round(elapsed, 2),
        "batches_per_s": round(count / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    loading = loading_patch_size(PATCH, augmentation_params(PATCH))
    loader = PhantomLoader(loading)
    runs = [measure(loader, w, args.seconds) for w in args.workers]
    print(
        json.dumps(
            {
                "patch": PATCH,
                "loading_patch": loading,
                "batch": BATCH,
                "channels": CHANNELS,
                "cpu_count": os.cpu_count(),
                "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
