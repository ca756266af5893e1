"""Quality control of a prediction: is this case like the training cases, and is its mask plausible?

Pure functions on arrays, geometry and the training fingerprint; ``predict`` puts what they
return into ``OUT/report.json``. The reference is built from ``fingerprint.json`` (plan
time), which every trained model has, rather than from ``autoseg select``'s cross-validation,
which is optional. Every threshold is a constant below, and the same table is in docs/trust.md.

Intensities are compared through each channel's quantiles inside the body (the non-zero
region), recorded per training case by the fingerprint (:func:`body_quantiles`). MRI comes in
arbitrary units that differ per scanner and per case, and its channels are normalised per case
(z-score), so for them only what survives any scale and offset counts; CT (and channels used as
they are) is in meaningful units, and its absolute range counts too:

* the **range** (absolute channels only: CT, ``none``): a case's 1st, 50th or 99th percentile
  further outside the training cases' range than ``INTENSITY_MARGIN`` times the training's
  typical spread (CT stored without its rescale);
* the **profile** (every channel): the inner quantiles rescaled to [0, 1] between the 1st and 99th
  percentile, the histogram's shape without scale or offset. Its distance to a training channel
  is a Mahalanobis distance (root mean square per quantile) from the training cases' mean profile
  under their covariance, shrunk towards its diagonal for few cases and with every standard
  deviation floored at ``PROFILE_SD_FLOOR``: it weighs how the quantiles move together, so a
  noisy or foreign histogram stands out even where each quantile alone is plausible. A channel is
  unlike training when its distance passes ``PROFILE_FACTOR`` times the 99th percentile of the
  training cases' own distances (each left out in turn, so the limit reflects a case the
  reference has not seen) and ``PROFILE_FLOOR``: a wrong sequence or modality (CT for an MRI
  model), heavy noise, or not a scan of this anatomy;
* **swapped channels**: each channel's profile against every training channel's; flagged
  when another order fits every moved channel within its limit, a moved channel lies further
  from its given place than 99 % of the training cases do, and the other order's distance is
  under ``SWAP_RATIO`` of the given one's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from autoseg.core.geometry import Geometry, orientation_code
from autoseg.data.preprocessing.fingerprint import BODY_QUANTILES

# --- thresholds (documented in docs/trust.md#qc-flags) -------------------------------------------
#: spacing (per axis) outside [training min / F, training max * F]
SPACING_FACTOR = 1.5
#: field of view (shape x spacing, per axis) outside [training min / F, training max * F]
FIELD_OF_VIEW_FACTOR = 1.5
#: a body percentile further outside the training range than this many typical spreads (p99 - p1)
INTENSITY_MARGIN = 1.0
#: a profile distance (Mahalanobis, per quantile) over F x the 99th percentile of the training cases'
#: leave-one-out distances, and over the floor, is unlike training
PROFILE_FACTOR = 1.25
PROFILE_FLOOR = 1.5
PROFILE_LIMIT_QUANTILE = 0.99
#: the smallest standard deviation of a rescaled quantile over training cases (1 % of the channel's range)
PROFILE_SD_FLOOR = 0.02
#: normalisation schemes whose units mean something (their absolute range is checked); the others
#: (z-score, rescale) are per case, so only what survives scale and offset is
ABSOLUTE_SCHEMES = ("ct", "none")
#: another channel order is "clearly better" when its profile distance is under this share of the given one's
SWAP_RATIO = 0.5
#: a predicted structure's volume outside [smallest training volume / F, largest * F]
VOLUME_FACTOR = 2.0
#: with --uncertainty: a non-empty structure's estimated Dice under this
LOW_ESTIMATED_DICE = 0.5
#: with --uncertainty: a structure's mean fold disagreement over this
HIGH_DISAGREEMENT = 0.2

THRESHOLDS = {
    "spacing_factor": SPACING_FACTOR,
    "field_of_view_factor": FIELD_OF_VIEW_FACTOR,
    "intensity_margin": INTENSITY_MARGIN,
    "profile_factor": PROFILE_FACTOR,
    "profile_floor": PROFILE_FLOOR,
    "profile_limit_quantile": PROFILE_LIMIT_QUANTILE,
    "profile_sd_floor": PROFILE_SD_FLOOR,
    "swap_ratio": SWAP_RATIO,
    "volume_factor": VOLUME_FACTOR,
    "low_estimated_dice": LOW_ESTIMATED_DICE,
    "high_disagreement": HIGH_DISAGREEMENT,
}

#: Indices of the 1st, 50th and 99th percentile in ``BODY_QUANTILES``.
_P01, _P50, _P99 = (BODY_QUANTILES.index(q) for q in (0.01, 0.50, 0.99))
_RANGE_LEVELS = {"p01": _P01, "median": _P50, "p99": _P99}

Flag = dict[str, str]  # {"flag": name, "reason": one line}


@dataclass(frozen=True)
class ChannelReference:
    """One training channel: the range of its body percentiles over the cases, its typical spread, its
    mean rescaled profile with the inverse of its (shrunk) covariance, and how far from that the training
    cases themselves lie. ``absolute``: its units mean something (CT), so its range is checked."""

    name: str
    low: tuple[float, ...]  # per BODY_QUANTILES level, the smallest over training cases
    high: tuple[float, ...]
    spread: float  # median over cases of p99 - p1
    profile: tuple[float, ...]  # mean rescaled profile over cases
    precision: tuple[tuple[float, ...], ...]  # inverse covariance of the profiles
    profile_limit: float
    absolute: bool = False
    #: the 99th percentile of the training cases' leave-one-out distances: further is unusual
    profile_typical: float = 0.0


@dataclass(frozen=True)
class StructureReference:
    """Training volumes (ml) of one structure: range over the cases that have it, and how many have it."""

    smallest_ml: float | None
    largest_ml: float | None
    present: int
    cases: int


@dataclass(frozen=True)
class TrainingReference:
    """What the training cases looked like, from ``fingerprint.json``."""

    spacing: tuple[tuple[float, ...], tuple[float, ...]]  # (min per axis, max per axis), array order
    field_of_view_mm: tuple[tuple[float, ...], tuple[float, ...]]
    channels: tuple[ChannelReference, ...] | None  # None: a version-1 fingerprint has no body intensities
    structures: dict[str, StructureReference]
    cases: int


def profile(quantiles: np.ndarray) -> np.ndarray:
    """The inner body quantiles ``(..., len(BODY_QUANTILES))`` rescaled to [0, 1] between the 1st and 99th
    percentile (zeros for a constant channel): the histogram's shape without the scanner's unit."""
    q = np.asarray(quantiles, dtype=np.float64)
    low, span = q[..., _P01 : _P01 + 1], q[..., _P99 : _P99 + 1] - q[..., _P01 : _P01 + 1]
    inner = q[..., _P01 + 1 : _P99]
    return np.divide(inner - low, span, out=np.zeros_like(inner), where=span > 0)


def profile_distance(profiles: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance over the last axis, divided by the root of its length: how far a profile lies
    from a training channel's, in training standard deviations per quantile (correlations included)."""
    d = np.asarray(profiles, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("...i,...ij,...j->...", d, precision, d), 0) / d.shape[-1])


def _mean_and_precision(profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The training profiles' mean and inverse covariance: shrunk towards the diagonal by ``dims / cases``
    (few cases cannot estimate correlations), every variance floored at ``PROFILE_SD_FLOOR`` squared."""
    n, dims = profiles.shape
    mean = profiles.mean(axis=0)
    covariance = np.cov(profiles.T) if n > 1 else np.zeros((dims, dims))
    shrink = min(1.0, dims / max(n, 1))
    covariance = (1 - shrink) * covariance + shrink * np.diag(np.diag(covariance))
    covariance += np.eye(dims) * PROFILE_SD_FLOOR**2
    return mean, np.linalg.inv(covariance)


def _channel_reference(name: str, quantiles: np.ndarray, absolute: bool) -> ChannelReference:
    """``quantiles``: ``(cases, len(BODY_QUANTILES))`` of one channel."""
    profiles = profile(quantiles)
    mean, precision = _mean_and_precision(profiles)
    left_out = [
        float(profile_distance(profiles[i], *_mean_and_precision(np.delete(profiles, i, axis=0))))
        for i in range(len(profiles))
    ]
    typical = float(np.quantile(left_out, PROFILE_LIMIT_QUANTILE)) if len(profiles) > 2 else 0.0
    return ChannelReference(
        name,
        tuple(quantiles.min(axis=0).tolist()),
        tuple(quantiles.max(axis=0).tolist()),
        float(np.median(quantiles[:, _P99] - quantiles[:, _P01])),
        tuple(mean.tolist()),
        tuple(tuple(row) for row in precision.tolist()),
        max(PROFILE_FACTOR * typical, PROFILE_FLOOR),
        absolute,
        typical,
    )


def absolute_channels(channel_names: Sequence[str], schemes: Sequence[str] | None = None) -> list[bool]:
    """Which channels have meaningful units: by the plan's normalisation ``schemes`` when given, else by name
    as the planner decides (a channel named CT)."""
    if schemes is not None:
        return [scheme in ABSOLUTE_SCHEMES for scheme in schemes]
    return [name.strip().lower() == "ct" for name in channel_names]


def training_reference(
    fingerprint: dict[str, Any],
    structures: dict[str, tuple[int, Sequence[int]]],
    schemes: Sequence[str] | None = None,
) -> TrainingReference:
    """The reference of a fingerprint; ``structures``: name -> (channel, the consecutive labels it covers),
    as :func:`autoseg.data.qc.uncertainty.structures_of` gives; ``schemes``: the plan's normalisation scheme
    per channel (None: decided by channel name, as the planner does)."""
    cases = list(fingerprint["cases"].values())
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    extents = np.array(
        [np.multiply(c.get("shape_before_crop", c["shape_after_crop"]), c["spacing"]) for c in cases], dtype=np.float64
    )
    channels = None
    if all("body_intensities" in c for c in cases):
        body = np.array([c["body_intensities"] for c in cases], dtype=np.float64)  # (cases, C, quantiles)
        names = list(fingerprint["channel_names"])
        absolute = absolute_channels(names, schemes)
        channels = tuple(_channel_reference(name, body[:, i], absolute[i]) for i, name in enumerate(names))
    voxel_ml = np.prod(spacings, axis=1) / 1000.0
    volumes = {}
    for name, (_, values) in structures.items():
        ml = np.array([sum(c.get("label_voxels", {}).get(str(v), 0) for v in values) for c in cases]) * voxel_ml
        present = ml[ml > 0]
        volumes[name] = StructureReference(
            float(present.min()) if present.size else None,
            float(present.max()) if present.size else None,
            int(present.size),
            len(ml),
        )
    return TrainingReference(
        (tuple(spacings.min(0)), tuple(spacings.max(0))),
        (tuple(extents.min(0)), tuple(extents.max(0))),
        channels,
        volumes,
        len(cases),
    )


def input_geometry(geometry: Geometry) -> dict[str, Any]:
    """Shape, spacing (mm), orientation code and field of view (mm) of an input, array order (z, y, x)."""
    return {
        "shape": list(geometry.shape),
        "spacing": [float(s) for s in geometry.spacing],
        "orientation": orientation_code(geometry) if geometry.ndim == 3 else None,
        "field_of_view_mm": [float(n * s) for n, s in zip(geometry.shape, geometry.spacing)],
    }


def _outside(values: Sequence[float], low: Sequence[float], high: Sequence[float], factor: float) -> list[int]:
    return [i for i, (v, lo, hi) in enumerate(zip(values, low, high)) if v < lo / factor or v > hi * factor]


def _axes(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def geometry_flags(geometry: Geometry, reference: TrainingReference) -> list[Flag]:
    """``spacing`` and ``field_of_view`` outside the training range (by the factors above)."""
    flags = []
    extent = [n * s for n, s in zip(geometry.shape, geometry.spacing)]
    for flag, values, (low, high), factor in (
        ("spacing", geometry.spacing, reference.spacing, SPACING_FACTOR),
        ("field_of_view", extent, reference.field_of_view_mm, FIELD_OF_VIEW_FACTOR),
    ):
        if _outside(values, low, high, factor):
            flags.append({"flag": flag, "reason": f"{_axes(values)} mm; training {_axes(low)} to {_axes(high)} mm"})
    return flags


def intensity_report(
    quantiles: np.ndarray, channel_names: Sequence[str], reference: TrainingReference | None
) -> tuple[dict[str, dict], list[Flag]]:
    """Per channel its body percentiles beside the training range and its profile distance; and the
    ``intensity_range``, ``intensity_profile`` and ``swapped_channels`` flags."""
    report = {
        name: {key: float(quantiles[i, level]) for key, level in _RANGE_LEVELS.items()}
        for i, name in enumerate(channel_names)
    }
    if reference is None or reference.channels is None:
        return report, []
    refs = reference.channels
    profiles = profile(quantiles)
    distances = np.array(
        [[float(profile_distance(p, np.array(r.profile), np.array(r.precision))) for r in refs] for p in profiles]
    )  # (case channel, training channel)
    out_of_range = []
    for i, (name, ref) in enumerate(zip(channel_names, refs)):
        entry = report[name]
        entry["training"] = {key: [ref.low[level], ref.high[level]] for key, level in _RANGE_LEVELS.items()}
        entry["profile_distance"], entry["profile_limit"] = float(distances[i, i]), ref.profile_limit
        far = _far_levels(quantiles[i], ref) if ref.absolute else []  # MRI units: any scale, any offset
        if far:
            out_of_range.append(f"{name} " + ", ".join(far))
    flags = [{"flag": "intensity_range", "reason": "; ".join(out_of_range)}] if out_of_range else []
    swap = _better_order(distances, [r.profile_limit for r in refs], [r.profile_typical for r in refs])
    if swap:
        moves = ", ".join(f"{channel_names[i]} looks like {refs[j].name}" for i, j in swap.items())
        flags.append({"flag": "swapped_channels", "reason": moves})
    unlike = [
        f"{name} (distance {distances[i, i]:.3f}, limit {refs[i].profile_limit:.3f})"
        for i, name in enumerate(channel_names)
        if distances[i, i] > refs[i].profile_limit and i not in swap
    ]
    if unlike:
        flags.append({"flag": "intensity_profile", "reason": "unlike training: " + "; ".join(unlike)})
    return report, flags


def _far_levels(quantiles: np.ndarray, ref: ChannelReference) -> list[str]:
    """The first body percentile (p01, median, p99) of one channel further outside the training range
    than ``INTENSITY_MARGIN`` typical spreads, described with that range; [] if none."""
    margin = INTENSITY_MARGIN * ref.spread
    return [
        f"{key} {quantiles[level]:.4g} (training {ref.low[level]:.4g}..{ref.high[level]:.4g})"
        for key, level in _RANGE_LEVELS.items()
        if not ref.low[level] - margin <= quantiles[level] <= ref.high[level] + margin
    ][:1]


def _better_order(distances: np.ndarray, limits: Sequence[float], typical: Sequence[float]) -> dict[int, int]:
    """Channel i -> training channel j for the channels a clearly better order moves; {} if none.

    Clearly better: every moved channel fits its new place within the limit, some moved channel is further
    from its own place than training cases usually are (``typical``), and the new order's distance is under
    ``SWAP_RATIO`` of the given one's. (Similar sequences, FLAIR and T1gd, can each stay within the limit
    when swapped; the order that fits twice as well still gives them away.)"""
    rows, columns = linear_sum_assignment(distances)
    moved = {int(i): int(j) for i, j in zip(rows, columns) if i != j}
    if not moved:
        return {}
    given = sum(distances[i, i] for i in moved)
    other = sum(distances[i, j] for i, j in moved.items())
    fits = all(distances[i, j] <= limits[j] for i, j in moved.items())
    unusual = any(distances[i, i] > typical[i] for i in moved)
    return moved if fits and unusual and other < SWAP_RATIO * given else {}


def structure_volumes(
    labels: np.ndarray, structures: dict[str, tuple[int, Sequence[int]]], voxel_ml: float
) -> dict[str, dict[str, float]]:
    """Per structure its voxel count and volume (ml) in a label map of consecutive labels."""
    out = {}
    for name, (_, values) in structures.items():
        voxels = int(np.count_nonzero(np.isin(labels, list(values))))
        out[name] = {"voxels": voxels, "volume_ml": voxels * voxel_ml}
    return out


def structure_statistics(
    labels: np.ndarray,
    data: np.ndarray,
    channel_names: Sequence[str],
    structures: dict[str, tuple[int, Sequence[int]]],
    voxel_ml: float,
) -> dict[str, dict]:
    """``--statistics``: per structure its voxels, volume (ml) and the mean raw intensity of every channel
    inside it (None for an empty structure)."""
    out = structure_volumes(labels, structures, voxel_ml)
    for name, (_, values) in structures.items():
        mask = np.isin(labels, list(values))
        out[name]["mean_intensity"] = {
            c: (float(data[i][mask].mean(dtype=np.float64)) if mask.any() else None)
            for i, c in enumerate(channel_names)
        }
    return out


def volume_report(
    volumes: dict[str, dict[str, float]], reference: TrainingReference | None
) -> tuple[dict[str, dict], list[Flag]]:
    """Per structure the predicted volume beside the training range; ``empty_structure`` (empty where every
    training case has it) and ``volume`` (outside the range by ``VOLUME_FACTOR``) flags."""
    report: dict[str, dict] = {name: {"volume_ml": v["volume_ml"]} for name, v in volumes.items()}
    if reference is None:
        return report, []
    empty, outside = [], []
    for name, entry in report.items():
        ref = reference.structures.get(name)
        if ref is None:
            continue
        entry["training_ml"] = [ref.smallest_ml, ref.largest_ml]
        entry["training_cases_with_it"] = f"{ref.present}/{ref.cases}"
        volume = entry["volume_ml"]
        if volume == 0 and ref.present == ref.cases:
            empty.append(name)
        elif (
            volume > 0
            and ref.present
            and not ref.smallest_ml / VOLUME_FACTOR <= volume <= ref.largest_ml * VOLUME_FACTOR
        ):
            outside.append(f"{name} {volume:.3g} ml (training {ref.smallest_ml:.3g}..{ref.largest_ml:.3g} ml)")
    flags = []
    if empty:
        flags.append(
            {"flag": "empty_structure", "reason": f"{', '.join(empty)} predicted empty; every training case has it"}
        )
    if outside:
        flags.append({"flag": "volume", "reason": "; ".join(outside)})
    return report, flags


def confidence_flags(structures: dict[str, dict]) -> list[Flag]:
    """``low_estimated_dice`` and ``fold_disagreement`` from ``predict --uncertainty``'s per-structure numbers
    (only non-empty structures: an empty one has no mask to doubt)."""
    low, apart = [], []
    for name, s in structures.items():
        if not s.get("volume_ml"):
            continue
        if s["estimated_dice"] < LOW_ESTIMATED_DICE:
            low.append(f"{name} {s['estimated_dice']:.2f}")
        if (s.get("mean_disagreement") or 0.0) > HIGH_DISAGREEMENT:
            apart.append(f"{name} {s['mean_disagreement']:.2f}")
    flags = []
    if low:
        flags.append(
            {"flag": "low_estimated_dice", "reason": f"estimated Dice {', '.join(low)} (under {LOW_ESTIMATED_DICE})"}
        )
    if apart:
        flags.append(
            {
                "flag": "fold_disagreement",
                "reason": f"mean fold disagreement {', '.join(apart)} (over {HIGH_DISAGREEMENT})",
            }
        )
    return flags


def flag_summary(case_id: str, flags: Sequence[Flag]) -> str:
    """The console's line for a case: ``case_003: 2 flags (swapped_channels, intensity_range)``."""
    if not flags:
        return f"{case_id}: no flags"
    return f"{case_id}: {len(flags)} flag{'s' if len(flags) > 1 else ''} ({', '.join(f['flag'] for f in flags)})"


def assess_case(
    geometry: Geometry,
    quantiles: np.ndarray,
    channel_names: Sequence[str],
    volumes: dict[str, dict[str, float]],
    confidence: dict[str, dict] | None,
    reference: TrainingReference | None,
) -> dict[str, Any]:
    """A case's report entry: ``flags`` first, then the input geometry, the intensities and the volumes
    beside training. ``quantiles``: :func:`~autoseg.data.preprocessing.fingerprint.body_quantiles` of the raw image;
    ``confidence``: ``predict --uncertainty``'s per-structure numbers, or None."""
    intensities, intensity_flags = intensity_report(quantiles, channel_names, reference)
    volume_entries, volume_flags = volume_report(volumes, reference)
    flags = (geometry_flags(geometry, reference) if reference is not None else []) + intensity_flags + volume_flags
    flags += confidence_flags(confidence) if confidence else []
    return {"flags": flags, "input": input_geometry(geometry), "intensities": intensities, "volumes": volume_entries}
