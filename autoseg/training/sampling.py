"""Patch sampling from preprocessed cases, with foreground oversampling.

Cases are drawn uniformly with replacement. In every batch the last third of the
samples (at least one when the batch has two or more) is centred on a stored
foreground location of a label chosen at random among those the case contains; the
others are placed uniformly. Under DDP each rank samples its own slice of the global
batch, so the foreground fraction of the global batch is what it would be on one
device. Patches leaving the image are padded: image 0, label -1 ("outside").

A cascade stage's cases carry the previous stage's mask on the same grid (``previous``); it is cut
from the same place as the label and travels as a second ``seg`` channel, so that the spatial
augmentation moves it with the image (nnU-Net's loader does the same).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.data.preprocessing.pipeline import OUTSIDE_MASK


@dataclass
class CaseRecord:
    """A preprocessed case on disk; arrays are memory-mapped on first use."""

    case_id: str
    folder: Path
    locations: dict[int, np.ndarray]
    #: a cascade stage's input: the previous stage's mask on this grid (``<case>.npy``, int8)
    previous: Path | None = None
    _data: np.ndarray | None = None
    _seg: np.ndarray | None = None
    _previous_seg: np.ndarray | None = None

    @classmethod
    def load(cls, folder: Path, case_id: str) -> CaseRecord:
        meta = json.loads((folder / f"{case_id}.json").read_text())
        locations = {
            int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3) for k, v in meta["foreground_locations"].items() if v
        }
        return cls(case_id, folder, locations)

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.folder / f"{self.case_id}.npy", mmap_mode="r")
        return self._data

    @property
    def seg(self) -> np.ndarray:
        if self._seg is None:
            self._seg = np.load(self.folder / f"{self.case_id}_seg.npy", mmap_mode="r")
        return self._seg

    def label_maps(self) -> list[np.ndarray]:
        """The labels, and for a cascade stage the previous stage's mask after them."""
        if self.previous is None:
            return [self.seg]
        if self._previous_seg is None:
            self._previous_seg = np.load(self.previous, mmap_mode="r")
        return [self.seg, self._previous_seg]


def forced_foreground(global_batch: int, fraction: float) -> list[bool]:
    """Which samples of a global batch are forced to contain foreground."""
    first_forced = round(global_batch * (1 - fraction))
    if global_batch >= 2:
        first_forced = min(first_forced, global_batch - 1)
    return [j >= first_forced for j in range(global_batch)]


class PatchSampler:
    """Infinite iterator of batches ``{"data": (B, C, *patch), "seg": (B, S, *patch), "keys": [...]}``
    (``S``: 1, or 2 for a cascade stage's cases, whose second channel is the previous stage's mask).

    ``patch_size`` is the patch to load (larger than the network patch when spatial
    augmentation follows). For a 2D configuration (``len(patch_size) == 2``) a slice is
    drawn first, through a foreground location when the sample is forced.
    Compatible with batchgenerators' augmenters (``set_thread_id``, ``__next__``).
    """

    def __init__(
        self,
        cases: Sequence[CaseRecord],
        patch_size: Sequence[int],
        batch_size: int,
        forced: Sequence[bool],
        final_patch_size: Sequence[int] | None = None,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.cases = list(cases)
        self.patch_size = [int(p) for p in patch_size]
        self.final_patch_size = [int(p) for p in (final_patch_size or patch_size)]
        self.batch_size = batch_size
        self.forced = list(forced)
        self.thread_id = 0

    def set_thread_id(self, thread_id: int) -> None:
        self.thread_id = thread_id

    def __iter__(self) -> PatchSampler:
        return self

    def __next__(self) -> dict:
        dims = len(self.patch_size)
        first = self.cases[0].data
        data = np.zeros((self.batch_size, first.shape[0], *self.patch_size), np.float32)
        maps = len(self.cases[0].label_maps())
        seg = np.full((self.batch_size, maps, *self.patch_size), OUTSIDE_MASK, np.int16)
        keys = []
        for j in range(self.batch_size):
            case = self.cases[np.random.randint(len(self.cases))]
            keys.append(case.case_id)
            location = self._foreground_location(case) if self.forced[j] else None
            volume, labels = case.data, case.label_maps()
            if dims == 2:
                index = int(location[0]) if location is not None else np.random.randint(volume.shape[1])
                volume, labels = volume[:, index], [m[index] for m in labels]
                location = location[1:] if location is not None else None
            self._crop_into(volume, labels, location, data[j], seg[j])
        return {"data": data, "seg": seg, "keys": keys}

    def _foreground_location(self, case: CaseRecord) -> np.ndarray | None:
        if not case.locations:
            return None
        label = list(case.locations)[np.random.randint(len(case.locations))]
        points = case.locations[label]
        return points[np.random.randint(len(points))]

    def _crop_into(
        self,
        volume: np.ndarray,
        labels: list[np.ndarray],
        centre: np.ndarray | None,
        out_data: np.ndarray,
        out_seg: np.ndarray,
    ) -> None:
        shape = volume.shape[1:]
        patch = self.patch_size
        lower, upper = patch_bounds(shape, patch, self.final_patch_size)
        if centre is None:
            start = [np.random.randint(lo, up + 1) for lo, up in zip(lower, upper)]
        else:
            start = forced_start(centre, patch, lower)
        src = tuple(slice(max(b, 0), min(b + p, s)) for b, p, s in zip(start, patch, shape))
        dst = tuple(slice(sl.start - b, sl.stop - b) for sl, b in zip(src, start))
        out_data[(slice(None),) + dst] = volume[(slice(None),) + src]
        for out, label_map in zip(out_seg, labels):
            out[dst] = label_map[src]


def patch_bounds(shape: Sequence[int], patch: Sequence[int], final_patch: Sequence[int]) -> tuple[list, list]:
    """Lowest and highest start of a loading patch: the final patch (its centre) fits inside the image where
    the image is large enough, and an image smaller than the patch sits in the middle, padded on both sides.

    nnU-Net's bounds: ``need`` voxels of padding in all, split between the sides (an odd one may fall on either)."""
    need = [max(p - f, p - s, 0) for p, f, s in zip(patch, final_patch, shape)]
    lower = [-((n + 1) // 2) for n in need]
    upper = [s + (n + 1) // 2 - p for s, n, p in zip(shape, need, patch)]
    return lower, upper


def forced_start(centre: Sequence[int], patch: Sequence[int], lower: Sequence[int]) -> list[int]:
    """The start of a forced-foreground patch: centred on the foreground voxel, held only at the lower bound.

    Centring on the voxel (not clamping it into the image's bounds on both sides) is what makes
    foreground oversampling matter on images smaller than the patch, the usual case for small
    structures such as the hippocampus: clamped, every patch showed the whole image at the same place,
    and the forced samples were no different from the random ones. Centred, the structure sits at the
    patch centre with the image shifted around it, as in nnU-Net's loader (which holds the start at the
    lower bound only, so a patch may overhang the image's upper side into padding)."""
    return [int(max(c - p // 2, lo)) for c, p, lo in zip(centre, patch, lower)]


def load_cases(folder: Path, case_ids: Sequence[str], previous: Mapping[str, Path] | None = None) -> list[CaseRecord]:
    """The preprocessed cases, each with its previous-stage mask from ``previous`` (a cascade stage)."""
    missing = [
        c for c in case_ids if not all((folder / f"{c}{end}").is_file() for end in (".json", ".npy", "_seg.npy"))
    ]
    if missing:
        from autoseg.core.errors import WorkspaceError

        raise WorkspaceError(
            f"{len(missing)} case(s) are not preprocessed in {folder} (e.g. {missing[0]}); "
            "run `autoseg plan` again to finish preprocessing"
        )
    cases = [CaseRecord.load(folder, c) for c in case_ids]
    return [dataclasses.replace(c, previous=previous[c.case_id]) for c in cases] if previous is not None else cases
