"""The tuning search space: declared once, as data, and validated.

``DEFAULT_SPACE`` lists every dimension with its range (``low``/``high``, optionally ``log``)
or its ``choices`` and whether it is ``enabled``. A JSON file of the same shape
(``autoseg tune --space FILE``) overrides any part of it; :func:`load_space` checks every
key and value. :func:`suggest` turns a space into one Optuna trial's parameters and
:func:`build_variant` turns parameters into a plan configuration that stays within the
plan's memory budget (the planner's own activation model and patch-shrinking rule).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autoseg.core.errors import PlanError
from autoseg.core.files import read_json_or_raise
from autoseg.core.plan import LOSSES, Configuration, Normalization, Plan
from autoseg.planning.planner import (
    REFERENCE_BATCH,
    REFERENCE_ELEMENTS,
    REFERENCE_GPU_GB,
    RESIDUAL_BLOCKS,
    fit_patch_to_budget,
)
from autoseg.planning.topology import Topology, activation_elements, derive_topology

SPACE_VERSION = 1
#: per-channel normalisation overrides; ``plan`` keeps the planned scheme.
NORMALIZATION_CHOICES = ("plan", "zscore", "zscore_masked", "rescale", "none")
MIN_FEATURES = 4

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    # initial learning rate of the poly schedule (SGD, Nesterov)
    "learning_rate": {"enabled": True, "low": 1e-3, "high": 3e-2, "log": True},
    # batch size as a multiple of the plan's; the patch shrinks until batch x patch fits the budget
    "batch_size": {"enabled": True, "choices": [1, 2]},
    # features per stage as a multiple of the plan's (a wider net gets a smaller patch if needed)
    "width": {"enabled": True, "choices": [0.5, 1.0, 1.5]},
    # resolution stages removed from the bottom of the U-Net (-1: one fewer than planned)
    "depth": {"enabled": True, "choices": [-1, 0]},
    # scale of the intensity augmentations (0: spatial transforms and mirroring only)
    "augmentation_strength": {"enabled": True, "low": 0.5, "high": 1.5},
    "loss": {"enabled": True, "choices": list(LOSSES)},
    # share of each batch forced to contain foreground
    "foreground_fraction": {"enabled": True, "low": 0.2, "high": 0.66},
    # one choice per channel; a change needs its own preprocessed data (done once per combination)
    "normalization": {"enabled": False, "choices": list(NORMALIZATION_CHOICES)},
}


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: dimension -> (may it be a range, check of one value, what a valid value is)
_RULES: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "learning_rate": (True, _positive, "a number > 0"),
    "batch_size": (False, _positive, "a multiplier > 0"),
    "width": (False, _positive, "a multiplier > 0"),
    "depth": (
        False,
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v <= 0,
        "an integer <= 0 (stages removed)",
    ),
    "augmentation_strength": (True, lambda v: _number(v) and v >= 0, "a number >= 0"),
    "loss": (False, lambda v: v in LOSSES, f"one of {list(LOSSES)}"),
    "foreground_fraction": (True, lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "normalization": (False, lambda v: v in NORMALIZATION_CHOICES, f"one of {list(NORMALIZATION_CHOICES)}"),
}


def load_space(path: Path | None = None, dimensions: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The default space, overridden by ``path`` (JSON) and limited to ``dimensions`` when given."""
    space = copy.deepcopy(DEFAULT_SPACE)
    if path is not None:
        data = read_json_or_raise(path, PlanError, "search space")
        if not isinstance(data, dict) or data.get("version") != SPACE_VERSION or set(data) != {"version", "dimensions"}:
            raise PlanError(f'{path}: a search space is {{"version": {SPACE_VERSION}, "dimensions": {{...}}}}')
        for name, entry in (data["dimensions"] or {}).items():
            if name not in space:
                raise PlanError(f"{path}: unknown dimension {name!r}; known: {sorted(space)}")
            if not isinstance(entry, dict):
                raise PlanError(f"{path}: dimension {name!r} must be an object")
            if "choices" in entry:  # a new domain replaces the old one
                space[name].pop("low", None), space[name].pop("high", None), space[name].pop("log", None)
            elif "low" in entry or "high" in entry:
                space[name].pop("choices", None)
            space[name].update(entry)
    if dimensions is not None:
        unknown = sorted(set(dimensions) - set(space))
        if unknown:
            raise PlanError(f"unknown dimension(s) {unknown}; known: {sorted(space)}")
        for name, entry in space.items():
            entry["enabled"] = name in dimensions
    validate_space(space)
    return space


def validate_space(space: dict[str, dict[str, Any]]) -> None:
    """Every dimension's keys and values, with a message naming the dimension and the fix."""
    for name, entry in space.items():
        if name not in _RULES:
            raise PlanError(f"unknown dimension {name!r}; known: {sorted(_RULES)}")
        may_range, check, what = _RULES[name]
        allowed = {"enabled", "choices"} | ({"low", "high", "log"} if may_range else set())
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise PlanError(f"dimension {name!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if not isinstance(entry.get("enabled", True), bool):
            raise PlanError(f"dimension {name!r}: 'enabled' must be true or false")
        if "choices" in entry:
            choices = entry["choices"]
            if not isinstance(choices, list) or not choices or not all(check(c) for c in choices):
                raise PlanError(f"dimension {name!r}: choices must be a non-empty list of {what}, got {choices!r}")
        elif "low" in entry and "high" in entry:
            low, high = entry["low"], entry["high"]
            if not (check(low) and check(high) and low < high):
                raise PlanError(f"dimension {name!r}: need low < high, each {what}; got {low!r}, {high!r}")
            if entry.get("log") and not low > 0:
                raise PlanError(f"dimension {name!r}: a log range needs low > 0, got {low!r}")
        else:
            raise PlanError(f"dimension {name!r}: give 'choices'" + (" or 'low' and 'high'" if may_range else ""))


def enabled(space: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, entry in space.items() if entry.get("enabled", True)]


def suggest(trial: Any, space: dict[str, dict[str, Any]], channel_names: Sequence[str]) -> dict[str, Any]:
    """Draw one trial's parameters (Optuna names: the dimension, or ``normalization_<i>``)."""
    params: dict[str, Any] = {}
    for name in enabled(space):
        entry = space[name]
        keys = [f"normalization_{i}" for i in range(len(channel_names))] if name == "normalization" else [name]
        for key in keys:
            if "choices" in entry:
                params[key] = trial.suggest_categorical(key, entry["choices"])
            else:
                params[key] = trial.suggest_float(key, entry["low"], entry["high"], log=bool(entry.get("log")))
    return params


# --------------------------------------------------------------------------- variant


def build_variant(plan: Plan, base: Configuration, name: str, params: dict[str, Any]) -> Configuration:
    """``base`` with ``params`` applied; network, patch and batch stay within the plan's memory budget."""
    training = dataclasses.replace(
        base.training,
        initial_lr=float(params.get("learning_rate", base.training.initial_lr)),
        loss=str(params.get("loss", base.training.loss)),
        augmentation_strength=float(params.get("augmentation_strength", base.training.augmentation_strength)),
        foreground_fraction=float(params.get("foreground_fraction", base.training.foreground_fraction)),
    )
    normalization = [
        _normalization(n, params.get(f"normalization_{i}", "plan")) for i, n in enumerate(base.normalization)
    ]
    config = dataclasses.replace(
        base,
        name=name,
        inherits_from=base.name,
        training=training,
        normalization=normalization,
        data_identifier=data_identifier_for(base, normalization),
    )
    multiplier, width, depth = params.get("batch_size", 1), params.get("width", 1.0), params.get("depth", 0)
    if (multiplier, width, depth) == (1, 1.0, 0):
        return config
    return _fit_network(plan, config, max(1, round(base.batch_size * multiplier)), float(width), int(depth))


def data_identifier_for(base: Configuration, normalization: list[Normalization]) -> str:
    """The preprocessing identity: the base's data unless normalisation changed, then one folder per scheme set."""
    if normalization == base.normalization:
        return base.data_identifier
    digest = hashlib.sha1(json.dumps([dataclasses.asdict(n) for n in normalization]).encode()).hexdigest()[:8]
    return f"{base.data_identifier}_norm_{digest}"


def _normalization(planned: Normalization, choice: str) -> Normalization:
    if choice == "plan":
        return planned
    if choice == "zscore_masked":
        return Normalization("zscore", use_mask=True)
    return Normalization(choice)


def _blocks(blocks: list[int] | None, n_stages: int) -> list[int] | None:
    """A residual encoder's block counts at another depth: the presets' counts (None for the plain U-Net)."""
    if blocks is None or len(blocks) == n_stages:
        return blocks
    return list(RESIDUAL_BLOCKS[:n_stages])


def _fit_network(plan: Plan, config: Configuration, batch: int, width: float, depth: int) -> Configuration:
    """Apply width and depth, then shrink the patch (planner rule) until ``batch`` samples fit."""
    net, dims = config.network, config.dims
    n_base = net.n_stages
    if n_base + depth < 2:
        raise PlanError(f"{config.name}: depth {depth} would leave fewer than 2 of the {n_base} stages")

    def cut(topology: Topology) -> Topology:
        n = min(len(topology.strides), n_base + depth)
        strides = topology.strides[:n]
        divisible = [math.prod(s[a] for s in strides) for a in range(dims)]
        return Topology(strides, topology.kernel_sizes[:n], topology.patch_size, divisible)

    def features(n: int) -> list[int]:
        return [max(MIN_FEATURES, round(f * width)) for f in net.features_per_stage[:n]]

    def estimate(topology: Topology) -> int:
        return activation_elements(
            topology.patch_size,
            topology.strides,
            features(len(topology.strides)),
            plan.num_classes,
            net.convs_per_stage_encoder,
            net.convs_per_stage_decoder,
        )

    start = cut(Topology(net.strides, net.kernel_sizes, list(config.patch_size), [1] * dims))
    # The base may sit just over the budget after rounding its batch size; allow what it uses.
    used_gb = (
        config.activation_estimate
        * config.batch_size
        / REFERENCE_BATCH[dims]
        / REFERENCE_ELEMENTS[dims]
        * REFERENCE_GPU_GB
    )
    topology, elements = fit_patch_to_budget(
        config.name,
        config.spacing,
        config.median_shape,
        start,
        lambda patch: cut(derive_topology(config.spacing, patch)),
        estimate,
        max(plan.gpu_memory_gb, used_gb),
        batch,
    )
    n = len(topology.strides)
    network = dataclasses.replace(
        net,
        kernel_sizes=topology.kernel_sizes,
        strides=topology.strides,
        features_per_stage=features(n),
        blocks_per_stage=_blocks(net.blocks_per_stage, n),
    )
    return dataclasses.replace(
        config,
        patch_size=list(topology.patch_size),
        batch_size=batch,
        network=network,
        activation_estimate=int(elements),
    )
