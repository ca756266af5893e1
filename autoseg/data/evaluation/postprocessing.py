"""Post-processing of predicted label maps, decided on cross-validation by ``autoseg select``.

Each step is a small frozen dataclass with one job, applied to a consecutive label map
``(z, y, x)`` (training values, before the dataset's own values are restored) on the
input grid. Steps round-trip through ``inference.json`` as ``{"kind": ..., **fields}``.

Connected components use full connectivity (26 neighbours in 3D), as nnU-Net does; when
several components share the largest size, all of them are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.core.errors import PlanError


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (every largest one on a tie); empty stays empty."""
    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return np.isin(components, np.flatnonzero(sizes == sizes.max()))


@dataclass(frozen=True)
class LargestComponent:
    """Keep only the largest connected component of the voxels holding any of ``values``;
    the rest become background. ``values`` is every foreground label, one label, or a region's labels."""

    values: tuple[int, ...]

    def apply(self, labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        mask = np.isin(labels, self.values)
        removed = mask & ~largest_component(mask)
        if not removed.any():
            return labels
        out = labels.copy()
        out[removed] = 0
        return out


@dataclass(frozen=True)
class RelabelSmall:
    """Relabel every ``source`` voxel as ``target`` when their total volume is below ``max_volume_mm3``.

    BraTS: a few voxels of predicted enhancing tumour in a case that has none cost its
    Dice entirely (0 instead of 1); calling them tumour core keeps whole tumour and core intact.
    """

    source: int
    target: int
    max_volume_mm3: float

    def apply(self, labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        mask = labels == self.source
        volume = int(np.count_nonzero(mask)) * math.prod(spacing)
        if not 0 < volume < self.max_volume_mm3:
            return labels
        out = labels.copy()
        out[mask] = self.target
        return out


Step = LargestComponent | RelabelSmall
#: ``kind`` in inference.json -> step class.
STEPS: dict[str, type] = {"largest_component": LargestComponent, "relabel_small": RelabelSmall}


def apply_steps(labels: np.ndarray, steps: Sequence[Step], spacing: Sequence[float]) -> np.ndarray:
    """Apply ``steps`` in order; ``spacing`` (mm, array order) turns voxel counts into volumes."""
    for step in steps:
        labels = step.apply(labels, spacing)
    return labels


def step_to_json(step: Step) -> dict[str, Any]:
    kind = next(k for k, cls in STEPS.items() if isinstance(step, cls))
    fields = dataclasses.asdict(step)
    return {"kind": kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


def step_from_json(data: Any, where: str = "post-processing step") -> Step:
    """Build a step from its JSON object; an unknown kind or field is a PlanError naming it."""
    if not isinstance(data, dict) or data.get("kind") not in STEPS:
        kind = data.get("kind") if isinstance(data, dict) else data
        raise PlanError(f"{where}: unknown kind {kind!r}; known: {', '.join(STEPS)}")
    cls = STEPS[data["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    given = set(data) - {"kind"}
    if given != names:
        raise PlanError(f"{where}: {data['kind']} needs fields {sorted(names)}, got {sorted(given)}")
    try:
        if cls is LargestComponent:
            return LargestComponent(tuple(int(v) for v in data["values"]))
        return RelabelSmall(int(data["source"]), int(data["target"]), float(data["max_volume_mm3"]))
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{where}: bad value in {data}: {exc}") from exc
