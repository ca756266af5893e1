"""The plan: frozen dataclasses that round-trip through versioned JSON.

``plans.json`` fully determines preprocessing, network, training and inference. It is
validated key by key on load: an unknown or missing key is a PlanError naming it, so a
hand-edited or tuned plan fails early and clearly. Arrays are in the plan's working
axis order (after ``transpose_forward``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.core.errors import PlanError
from autoseg.core.files import read_json_or_raise, write_json

PLAN_VERSION = 1


@dataclass(frozen=True)
class Normalization:
    """How one channel is normalised.

    ``zscore``: per image, over the non-zero mask when ``use_mask`` (background stays 0).
    ``ct``: clip to the dataset foreground ``[lower, upper]`` then ``(x - mean) / std``.
    ``none``: cast only. ``rescale``: per-image min-max to [0, 1].
    """

    scheme: str
    use_mask: bool = False
    mean: float | None = None
    std: float | None = None
    lower: float | None = None
    upper: float | None = None


#: network architectures a plan may name (see :mod:`autoseg.model.network`).
ARCHITECTURES = ("plain", "residual_encoder")


@dataclass(frozen=True)
class Network:
    """U-Net topology: one entry per resolution stage, highest resolution first.

    ``architecture``: ``plain`` (``convs_per_stage_encoder`` conv-norm-act blocks per stage, nnU-Net's
    PlainConvUNet) or ``residual_encoder`` (a stem conv, then ``blocks_per_stage`` residual blocks per
    encoder stage: nnU-Net's ResidualEncoderUNet of the ResEnc presets); the decoder is the same for both.
    """

    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    features_per_stage: list[int]
    convs_per_stage_encoder: int = 2
    convs_per_stage_decoder: int = 2
    architecture: str = "plain"
    blocks_per_stage: list[int] | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise PlanError(f"network.architecture {self.architecture!r} is unknown; choose from {list(ARCHITECTURES)}")
        if self.architecture == "residual_encoder" and (
            self.blocks_per_stage is None or len(self.blocks_per_stage) != len(self.strides)
        ):
            raise PlanError("network.blocks_per_stage must give one residual block count per stage")

    @property
    def n_stages(self) -> int:
        return len(self.strides)


@dataclass(frozen=True)
class Resampling:
    """Interpolation orders. An axis whose spacing is more than ``anisotropy_threshold`` times
    the finest is resampled on its own with ``coarse_axis_order`` (0: nearest)."""

    image_order: int = 3
    label_order: int = 1
    probabilities_order: int = 1
    coarse_axis_order: int = 0
    anisotropy_threshold: float = 3.0


#: loss variants a configuration may name (see :mod:`autoseg.model.losses`).
LOSSES = ("dice_ce", "dice_focal", "dice_topk")


@dataclass(frozen=True)
class Training:
    """Training-side choices of a configuration; the defaults are nnU-Net's recipe.

    Planned configurations keep the defaults (and ``plans.json`` leaves the record out);
    tuned variants override some of them.
    """

    initial_lr: float = 1e-2
    #: ``dice_ce``; ``dice_focal`` (focal instead of plain cross-entropy); ``dice_topk``
    #: (cross-entropy of the hardest 10 % of voxels).
    loss: str = "dice_ce"
    #: scales the intensity augmentations (0: spatial and mirroring only).
    augmentation_strength: float = 1.0
    #: share of each batch forced to contain foreground.
    foreground_fraction: float = 0.33

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise PlanError(f"training.loss {self.loss!r} is unknown; choose from {list(LOSSES)}")
        if not self.initial_lr > 0:
            raise PlanError(f"training.initial_lr must be > 0, got {self.initial_lr}")
        if not self.augmentation_strength >= 0:
            raise PlanError(f"training.augmentation_strength must be >= 0, got {self.augmentation_strength}")
        if not 0 <= self.foreground_fraction <= 1:
            raise PlanError(f"training.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")


@dataclass(frozen=True)
class Configuration:
    """One trainable configuration (``3d_fullres``, ``2d``, ``3d_lowres``, tuned variants)."""

    name: str
    dims: int
    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    median_shape: list[int]
    network: Network
    normalization: list[Normalization]
    resampling: Resampling
    batch_dice: bool
    data_identifier: str
    activation_estimate: int
    #: base configuration of a variant: plans.json stores only the keys that differ from it.
    inherits_from: str | None = None
    training: Training = Training()
    #: axes of the patch that test-time augmentation mirrors (None: every axis); an imported nnU-Net model
    #: keeps the axes its trainer allowed (``inference_allowed_mirroring_axes``).
    mirror_axes: list[int] | None = None
    #: a cascade stage (``3d_cascade_fullres``): the configuration whose predicted mask, one-hot, the network
    #: reads as extra input channels (:meth:`Plan.input_channels`); None: a first stage.
    previous_stage: str | None = None


def foreground_labels(labels: Mapping[str, int]) -> dict[str, int]:
    """Name -> value of the labels a model segments: all but background (0) and the ``ignore`` label."""
    return {name: value for name, value in labels.items() if value > 0 and name != "ignore"}


@dataclass(frozen=True)
class Region:
    """A union of labels trained as one sigmoid output (e.g. BraTS whole tumour = 1, 2, 3).

    The one region type of the package: datasets declare regions with it, the plan stores
    them, evaluation scores them and prediction paints them.
    """

    name: str
    labels: list[int]
    #: label written where this region is predicted; later regions paint over earlier ones.
    paint_value: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Region:
        """A region from its JSON object (``fingerprint.json``, the work folder's ``dataset.json``)."""
        return cls(str(data["name"]), [int(v) for v in data["labels"]], int(data["paint_value"]))


@dataclass(frozen=True)
class PlannedLike:
    """Where an adopted topology came from (``autoseg plan --like MODEL``)."""

    #: the model as the command line named it (an exported zip, a work or model folder).
    source: str
    #: the dataset the source model was planned for.
    dataset: str
    #: :func:`plan_digest` of the source model's plan: which plan, exactly, was adopted.
    plan_digest: str
    #: ``plan --channel-map``: a channel of this dataset -> the model's channel whose input filters it takes
    channel_map: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class ImportedModel:
    """Where a model trained by another tool came from (``autoseg import`` of an nnU-Net v2 results folder or zip).

    Prediction then follows that tool's arithmetic where it differs from autoseg's own: nnU-Net averages
    the logits of the mirrored passes and the folds (autoseg: their probabilities)."""

    tool: str
    source: str
    trainer: str
    plans_name: str
    configuration: str


@dataclass(frozen=True)
class Plan:
    """Everything every later stage needs, derived from the fingerprint."""

    version: int
    dataset: str
    channel_names: list[str]
    labels: dict[str, int]
    regions: list[Region]
    #: consecutive training value -> value written in predictions (e.g. BraTS 3 -> 4).
    output_label_values: dict[str, int]
    transpose_forward: list[int]
    transpose_backward: list[int]
    original_median_spacing: list[float]
    original_median_shape: list[int]
    gpu_memory_gb: float
    configurations: dict[str, Configuration]
    #: set when the network topology and spacing were taken from a trained model.
    planned_like: PlannedLike | None = None
    #: set when the model was trained by another tool and imported (nnU-Net v2).
    imported_from: ImportedModel | None = None

    def __post_init__(self) -> None:
        for name in self.configurations:
            chain = [name]
            while (previous := self.configurations[chain[-1]].previous_stage) is not None:
                if previous not in self.configurations:
                    raise PlanError(
                        f"configuration {chain[-1]!r} has previous_stage {previous!r}, which is not in the plan "
                        f"(it has {sorted(self.configurations)})"
                    )
                if previous in chain:
                    raise PlanError(f"previous_stage forms a cycle ({' -> '.join([*chain, previous])})")
                chain.append(previous)

    def configuration(self, name: str) -> Configuration:
        if name not in self.configurations:
            raise PlanError(f"no configuration {name!r} in the plan; it has {sorted(self.configurations)}")
        return self.configurations[name]

    @property
    def num_classes(self) -> int:
        """Network outputs: one per region in region mode, else one per label incl. background."""
        return len(self.regions) if self.regions else len([n for n in self.labels if n != "ignore"])

    @property
    def stage_labels(self) -> list[int]:
        """The label values a cascade stage reads one-hot from its previous stage's mask, one channel each:
        the foreground labels (background and ``ignore`` have no channel), as nnU-Net's cascade."""
        return sorted(foreground_labels(self.labels).values())

    def input_channels(self, config: Configuration) -> int:
        """Input channels of ``config``'s network: the image channels, and for a cascade stage one channel per
        :attr:`stage_labels`."""
        return len(self.channel_names) + (len(self.stage_labels) if config.previous_stage is not None else 0)

    def next_stages(self, name: str) -> list[str]:
        """The cascade stages that read ``name``'s predictions (nnU-Net's ``next_stage``)."""
        return [n for n, c in self.configurations.items() if c.previous_stage == name]

    @property
    def is_3d(self) -> bool:
        """The data are volumes (every axis of the median image longer than one voxel), not single slices."""
        return min(self.original_median_shape) > 1

    @property
    def scored_classes(self) -> list[str]:
        """The classes whose mean Dice is *the* score (tuning and selection alike): the regions of a
        region task (BraTS: whole tumour, tumour core, enhancing tumour), else the foreground labels."""
        return [r.name for r in self.regions] or list(foreground_labels(self.labels))


# --------------------------------------------------------------------------- JSON


def to_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: variants keep only their overrides, default training records are left out."""
    data = dataclasses.asdict(plan)
    for key in ("planned_like", "imported_from"):
        if data[key] is None:
            del data[key]
    if "planned_like" in data and not data["planned_like"]["channel_map"]:  # plans adopted without a map
        del data["planned_like"]["channel_map"]  # read as they always did
    full = {name: _without_defaults(config) for name, config in data["configurations"].items()}
    data["configurations"] = {}
    for name, config in full.items():
        base = full.get(config["inherits_from"]) if config["inherits_from"] else None
        if base is not None:
            data["configurations"][name] = {
                "inherits_from": config["inherits_from"],
                **_difference(config, base, skip=("name", "inherits_from")),
            }
        elif config["training"] == dataclasses.asdict(Training()):
            data["configurations"][name] = {k: v for k, v in config.items() if k != "training"}
        else:
            data["configurations"][name] = config
    return data


def _without_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration's JSON without the optional keys at their defaults (plans written before they existed)."""
    network = {k: v for k, v in config["network"].items() if (k, v) not in (("architecture", "plain"),)}
    if network.get("blocks_per_stage", 0) is None:
        del network["blocks_per_stage"]
    return {
        k: network if k == "network" else v
        for k, v in config.items()
        if not (k in ("mirror_axes", "previous_stage") and v is None)
    }


def plan_digest(plan: Plan) -> str:
    """A short content hash of the plan as saved: two plans with one digest build the same networks."""
    import hashlib
    import json

    text = json.dumps(to_json(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def channel_key(name: str) -> str:
    """Channel names compare case- and punctuation-insensitively (``T1-Gd`` = ``t1gd``)."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def save_plan(path: Path, plan: Plan) -> None:
    write_json(path, to_json(plan))


def load_plan(path: Path) -> Plan:
    return plan_from_json(read_json_or_raise(path, PlanError, "plan"), where=str(path))


def plan_from_json(data: dict[str, Any], where: str = "plan") -> Plan:
    if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise PlanError(f"{where}: plan version {version!r} is not supported (expected {PLAN_VERSION})")
    configurations = data.get("configurations")
    if isinstance(configurations, dict):
        data = {**data, "configurations": _resolve_variants(configurations, f"{where}.configurations")}
    return _build(Plan, data, where)


def _resolve_variants(configurations: dict[str, Any], where: str) -> dict[str, Any]:
    """Expand every ``{"inherits_from": base, <overrides>}`` into a full configuration."""
    resolved: dict[str, Any] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Any:
        if name in resolved:
            return resolved[name]
        entry = configurations[name]
        base_name = entry.get("inherits_from") if isinstance(entry, dict) else None
        if base_name is None:
            resolved[name] = entry
            return entry
        if base_name in chain or base_name == name:
            raise PlanError(f"{where}.{name}: inherits_from forms a cycle ({' -> '.join((*chain, name, base_name))})")
        if base_name not in configurations:
            raise PlanError(
                f"{where}.{name}: inherits_from {base_name!r}, which is not in the plan "
                f"(it has {sorted(configurations)}); add the base or remove the variant"
            )
        base = resolve(base_name, (*chain, name))
        if not isinstance(base, dict):
            raise PlanError(f"{where}.{base_name}: expected an object, got {type(base).__name__}")
        resolved[name] = _merge(base, {"name": name, **entry})
        return resolved[name]

    for name in configurations:
        resolve(name, ())
    return resolved


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; nested objects merge key by key, lists are replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _difference(config: dict[str, Any], base: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of ``config`` that differ from ``base`` (nested objects: only their differing keys)."""
    diff = {}
    for key, value in config.items():
        if key in skip or base.get(key) == value:
            continue
        diff[key] = (
            _difference(value, base[key]) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return diff


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from JSON, checking every key and value type."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{where}: missing key {name!r}")
            continue
        kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from exc


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except PlanError as exc:
                errors.append(str(exc))
        raise PlanError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: expected an object, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise PlanError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
