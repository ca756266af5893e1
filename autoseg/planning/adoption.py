"""``autoseg plan --like MODEL``: a plan for new data that keeps a trained model's network.

nnU-Net loads pretrained weights only into an identical network, so users copy plans between
datasets by hand. Here the new plan takes, per configuration of the source model, its network
topology (kernels, strides, features), its target spacing and its transposition, so every
weight of the model fits; the new data's fingerprint still decides the channels, labels,
normalisation statistics, the median shape, and the patch and batch sizes:

- the patch is the source's, clipped per axis to the new data's median image (padded up to
  the axis's total stride, as the planner does), never larger: the source's patch was fitted
  to its GPU budget, and a patch larger than the images only adds padding;
- the batch is sized for the new patch under ``--gpu-memory``, as the planner sizes it.

The adoption is checked: 2D data cannot take a 3D model (or the reverse). Channels are matched
by name, as ``train --pretrained`` maps them, or by ``channel_map`` (``--channel-map CT=FLAIR``:
this dataset's CT takes the model's FLAIR filters), which the plan records; a channel matched by
neither starts from the mean of the model's input filters, and a dataset with no channel in
common (a CT task on a brain MRI model) is planned too, with a note saying so. A spacing more
than 2x away from the new data's median, or CT intensities far from the model's, are warnings
(one line each).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from autoseg.core.errors import PlanError
from autoseg.core.plan import Configuration, Normalization, Plan, PlannedLike, channel_key, plan_digest
from autoseg.planning.planner import (
    MIN_BATCH,
    REFERENCE_BATCH,
    activation_budget,
    batch_size_for,
    median_shape_at,
    plan_from_fingerprint,
)
from autoseg.planning.topology import activation_elements

#: resampling by more than this factor on an axis is worth a warning.
SPACING_WARN_RATIO = 2.0
#: CT statistics: a mean shifted by more than this many of the model's standard deviations, or a
#: standard deviation this many times larger or smaller, is worth a warning.
CT_MEAN_WARN_STDS = 1.0
CT_STD_WARN_RATIO = 2.0


def plan_like(
    source: Plan,
    fingerprint: dict[str, Any],
    source_name: str,
    gpu_memory_gb: float,
    configurations: Sequence[str] | None = None,
    channel_map: dict[str, str] | None = None,
) -> tuple[Plan, list[str]]:
    """The plan of the fingerprinted data with ``source``'s networks and spacings, and the warnings.

    ``configurations`` limits which of the source's configurations are adopted (default: all);
    ``channel_map``: this dataset's channel -> the model's channel it takes the input filters of.
    """
    own = plan_from_fingerprint(fingerprint, gpu_memory_gb)
    where = f"cannot plan {own.dataset} like {source_name}"
    _check_dimensionality(source, own, where)
    channel_map = _check_channel_map(source, own, dict(channel_map or {}), where)
    names = list(configurations or source.configurations)
    unknown = [n for n in names if n not in source.configurations]
    if unknown:
        raise PlanError(
            f"{where}: it has no configuration {', '.join(unknown)} (it has {', '.join(source.configurations)})"
        )
    for name in list(names):  # a cascade stage comes with its base and its previous stage
        config = source.configurations[name]
        if config.previous_stage is not None:
            names = list(dict.fromkeys([config.inherits_from or name, config.previous_stage, *names]))
    cases = fingerprint["cases"].values()
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    shapes = np.array([c["shape_after_crop"] for c in cases], dtype=np.float64)
    normalization = own.configurations[next(iter(own.configurations))].normalization
    adopted = {
        n: _adopt(
            source.configurations[n],
            source.transpose_forward,
            spacings,
            shapes,
            normalization,
            own.num_classes,
            gpu_memory_gb,
        )
        for n in names
    }
    adopted = {n: _shared_data(c, adopted, source.transpose_forward, spacings) for n, c in adopted.items()}
    plan = dataclasses.replace(
        own,
        transpose_forward=list(source.transpose_forward),
        transpose_backward=list(source.transpose_backward),
        gpu_memory_gb=float(gpu_memory_gb),
        configurations=adopted,
        planned_like=PlannedLike(source_name, source.dataset, plan_digest(source), channel_map),
    )
    warnings = (
        _channel_notes(source, own, channel_map)
        + _spacing_warnings(plan, source_name)
        + _intensity_warnings(source, own, source_name)
        + _memory_warnings(plan)
    )
    return plan, list(dict.fromkeys(warnings))


def _check_dimensionality(source: Plan, own: Plan, where: str) -> None:
    if source.is_3d != own.is_3d:

        def kind(plan: Plan) -> str:
            return (
                f"{'3D' if plan.is_3d else '2D'} images (median shape {'×'.join(map(str, plan.original_median_shape))})"
            )

        raise PlanError(
            f"{where}: the model was planned for {kind(source)}, {own.dataset} has {kind(own)}; plan it without --like"
        )


def _check_channel_map(source: Plan, own: Plan, channel_map: dict[str, str], where: str) -> dict[str, str]:
    """``--channel-map``: every key a channel of this dataset, every value one of the model's (names as
    ``channel_key`` compares them); returned with both sides spelt as the plans spell them."""
    ours = {channel_key(n): n for n in own.channel_names}
    theirs = {channel_key(n): n for n in source.channel_names}
    unknown = [k for k in channel_map if channel_key(k) not in ours]
    if unknown:
        raise PlanError(f"{where}: --channel-map names {unknown}, not channels of {own.dataset} {own.channel_names}")
    foreign = [v for v in channel_map.values() if channel_key(v) not in theirs]
    if foreign:
        raise PlanError(f"{where}: --channel-map names {foreign}, not channels of the model {source.channel_names}")
    return {ours[channel_key(k)]: theirs[channel_key(v)] for k, v in channel_map.items()}


def _working_axes(config: Configuration, transpose_forward: Sequence[int]) -> list[int]:
    """The file axes a configuration's per-axis values refer to (a 2D configuration: the last two)."""
    return list(transpose_forward)[-config.dims :]


def _adopt(
    config: Configuration,
    transpose_forward: Sequence[int],
    spacings: np.ndarray,
    shapes: np.ndarray,
    normalization: list[Normalization],
    num_classes: int,
    gpu_memory_gb: float,
) -> Configuration:
    """``config``'s network and spacing, with the patch clipped to the new median image and a new batch."""
    axes = _working_axes(config, transpose_forward)
    median = [float(m) for m in median_shape_at(config.spacing, spacings[:, axes], shapes[:, axes])]
    strides = config.network.strides
    divisible = [math.prod(s[a] for s in strides) for a in range(config.dims)]
    patch = [min(p, max(d, math.ceil(m / d) * d)) for p, d, m in zip(config.patch_size, divisible, median)]
    elements = activation_elements(
        patch,
        strides,
        config.network.features_per_stage,
        num_classes,
        config.network.convs_per_stage_encoder,
        config.network.convs_per_stage_decoder,
    )
    dataset_voxels = float(np.prod(median)) * len(spacings)
    return dataclasses.replace(
        config,
        patch_size=patch,
        median_shape=[int(round(m)) for m in median],
        normalization=list(normalization),
        batch_size=batch_size_for(config.dims, elements, patch, dataset_voxels, gpu_memory_gb),
        activation_estimate=int(elements),
    )


def _shared_data(
    config: Configuration, adopted: dict[str, Configuration], transpose_forward: Sequence[int], spacings: np.ndarray
) -> Configuration:
    """Keep sharing another configuration's preprocessed data only where it serves this one on the new data
    (a variant: the same spacing; ``2d``: the 3D data when every case's slices are already at its spacing)."""
    other = adopted.get(config.data_identifier)
    if config.data_identifier == config.name:
        return config
    if other is not None and other.data_identifier == other.name:
        if other.spacing == config.spacing:
            return config
        if (
            config.dims == 2
            and other.dims == 3
            and other.spacing[1:] == config.spacing
            and bool(np.allclose(spacings[:, transpose_forward[0]], other.spacing[0], rtol=1e-3))
        ):
            return config
    return dataclasses.replace(config, data_identifier=config.name)


def _channel_notes(source: Plan, own: Plan, channel_map: dict[str, str]) -> list[str]:
    """What ``train --pretrained`` will do with each channel: mapped, matched by name, or from the mean."""
    theirs = {channel_key(s) for s in source.channel_names}
    taken = {channel_key(channel_map.get(n, n)) for n in own.channel_names}
    new = [n for n in own.channel_names if channel_key(channel_map.get(n, n)) not in theirs]
    missing = [n for n in source.channel_names if channel_key(n) not in taken]
    notes = [f"channel {n!r} takes the model's {m!r} input filters (--channel-map)" for n, m in channel_map.items()]
    if new and len(new) == len(own.channel_names):
        notes.append(
            f"no channel of {own.dataset} {own.channel_names} is one of the model's {source.channel_names}: "
            "`train --pretrained` starts each one's input filters from the mean of the model's (all other "
            "weights load); --channel-map NEW=MODEL (e.g. CT=FLAIR) takes one channel's filters instead"
        )
    elif new:
        notes.append(
            f"channel(s) {new} are not the model's: `train --pretrained` starts their input filters from "
            "the mean of the model's"
        )
    if missing:
        notes.append(
            f"the model's channel(s) {missing} are not in {own.dataset}: `train --pretrained` drops their input filters"
        )
    return notes


def _spacing_warnings(plan: Plan, source_name: str) -> list[str]:
    """One line per configuration whose spacing resamples the new data by more than 2x on an axis."""
    median = np.asarray(plan.original_median_spacing, dtype=np.float64)
    warnings = []
    for config in plan.configurations.values():
        if config.name == "3d_lowres" or config.inherits_from:
            continue  # coarse by design; a variant has its base's spacing
        own = median[_working_axes(config, plan.transpose_forward)]
        ratios = np.asarray(config.spacing) / own
        worst = int(np.argmax(np.maximum(ratios, 1 / ratios)))
        factor = max(ratios[worst], 1 / ratios[worst])
        if factor > SPACING_WARN_RATIO:
            warnings.append(
                f"{config.name}: {source_name}'s spacing {_mm(config.spacing)} mm is {factor:.1f}x "
                f"{'coarser' if ratios[worst] > 1 else 'finer'} than {plan.dataset}'s median {_mm(own)} mm on one "
                "axis: the images are resampled by that factor, so structures look different in size to the model"
            )
    return warnings


def _intensity_warnings(source: Plan, own: Plan, source_name: str) -> list[str]:
    """Dataset-level (CT) statistics of shared channels far from the model's; per-image z-scores need no check."""
    theirs = {channel_key(n): norm for n, norm in zip(source.channel_names, _first(source).normalization)}
    warnings = []
    for name, norm in zip(own.channel_names, _first(own).normalization):
        other = theirs.get(channel_key(name))
        if other is None:
            continue
        if other.scheme != norm.scheme:
            warnings.append(
                f"channel {name}: the model normalised it as {other.scheme}, {own.dataset} needs "
                f"{norm.scheme}: the model sees another intensity scale"
            )
        elif norm.scheme == "ct" and other.std and norm.std:
            shift = abs(norm.mean - other.mean) / other.std
            ratio = max(norm.std / other.std, other.std / norm.std)
            if shift > CT_MEAN_WARN_STDS or ratio > CT_STD_WARN_RATIO:
                warnings.append(
                    f"channel {name}: foreground intensities (mean {norm.mean:.0f}, sd {norm.std:.0f}) "
                    f"differ from {source_name}'s (mean {other.mean:.0f}, sd {other.std:.0f}): another "
                    "scanner or protocol; expect fine-tuning to need more epochs"
                )
    return warnings


def _memory_warnings(plan: Plan) -> list[str]:
    """An adopted patch the ``--gpu-memory`` budget cannot hold even at the smallest batch."""
    return [
        f"{c.name}: the model's patch {_mm(c.patch_size)} needs more than --gpu-memory {plan.gpu_memory_gb:g} GB "
        f"at batch {MIN_BATCH}; train it on a larger GPU"
        for c in plan.configurations.values()
        if c.activation_estimate / REFERENCE_BATCH[c.dims] * MIN_BATCH > activation_budget(c.dims, plan.gpu_memory_gb)
    ]


def _first(plan: Plan) -> Configuration:
    return next(iter(plan.configurations.values()))


def _mm(values: Sequence[float]) -> str:
    return "×".join(f"{v:.3g}" for v in values)
