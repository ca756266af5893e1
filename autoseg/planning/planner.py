"""Derive a plan from a fingerprint: pure functions, each rule unit-tested.

The baseline is nnU-Net v2's default planner (same constants, same results on the
reference fingerprints in ``plans/``); the memory budget is a parameter
(``gpu_memory_gb``) instead of a class to subclass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.core.errors import PlanError
from autoseg.core.plan import PLAN_VERSION, Configuration, Network, Normalization, Plan, Region, Resampling
from autoseg.planning.topology import (
    Topology,
    activation_elements,
    derive_topology,
    features_per_stage,
    residual_activation_elements,
)

ANISOTROPY_RATIO = 3.0
#: Activation elements a batch of REFERENCE_BATCH may use per 8 GB of GPU memory.
REFERENCE_ELEMENTS = {3: 560e6, 2: 85e6}
REFERENCE_BATCH = {3: 2, 2: 12}
REFERENCE_GPU_GB = 8.0
MIN_BATCH = 2
MAX_DATASET_FRACTION_PER_BATCH = 0.05
INITIAL_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
LOWRES_PATCH_COVERAGE = 0.25
LOWRES_SPACING_STEP = 1.03
MASKED_NORM_MAX_RELATIVE_SIZE = 0.75
KNOWN_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
#: nnU-Net's cascade: the full-resolution network that also reads the low-resolution stage's mask.
CASCADE = "3d_cascade_fullres"
#: residual blocks per encoder stage of the residual-encoder presets (nnU-Net's ResEncUNetPlanner).
RESIDUAL_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


@dataclass(frozen=True)
class Preset:
    """A planner's constants: the network it plans and the memory it plans for.

    ``default`` is nnU-Net's ExperimentPlanner (plain U-Net); ``resenc-m/l/xl`` are its
    nnUNetPlannerResEncM/L/XL (residual-encoder U-Net, one decoder conv per stage): larger activation
    budgets for their GPU targets (8, 24, 40 GB), the patch shrunk until the reference batch (not
    two samples) fits, and no cap of the batch at 5 % of the dataset (they may cover all of it).
    """

    name: str
    architecture: str
    reference_elements: dict[int, float]
    gpu_memory_gb: float
    max_dataset_fraction: float
    #: samples that must fit while the patch shrinks; None: the reference batch.
    fit_batch: int | None

    @property
    def suffix(self) -> str:
        """What the preset's configuration names end with (``3d_fullres_resenc_l``); empty for the default."""
        return "" if self.name == "default" else "_" + self.name.replace("-", "_")


PRESETS = {
    "default": Preset(
        "default", "plain", REFERENCE_ELEMENTS, REFERENCE_GPU_GB, MAX_DATASET_FRACTION_PER_BATCH, MIN_BATCH
    ),
    "resenc-m": Preset("resenc-m", "residual_encoder", {3: 680e6, 2: 135e6}, 8.0, 1.0, None),
    "resenc-l": Preset("resenc-l", "residual_encoder", {3: 2100e6, 2: 380e6}, 24.0, 1.0, None),
    "resenc-xl": Preset("resenc-xl", "residual_encoder", {3: 3600e6, 2: 560e6}, 40.0, 1.0, None),
}
DEFAULT_PRESET = PRESETS["default"]


def preset_named(name: str) -> Preset:
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> list[float]:
    """Median spacing; a clearly coarser axis (anisotropic data) uses its 10th percentile.

    An axis counts as coarse when its median spacing is more than 3x every other axis
    *and* its median size is more than 3x smaller: typical thick-slice CT/MRI. Using a
    finer value than the median keeps more through-plane detail without oversampling.
    """
    target = np.median(spacings, axis=0)
    size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    coarse = target[worst] > ANISOTROPY_RATIO * max(target[others]) and size[worst] * ANISOTROPY_RATIO < min(
        size[others]
    )
    if coarse:
        p10 = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(p10, float(max(target[others])) + 1e-5)
    return [float(t) for t in target]


def transpose_for(spacing: Sequence[float]) -> list[int]:
    """Axis order putting the coarsest axis first (so 2D configurations slice across it)."""
    coarse = int(np.argmax(spacing))
    return [coarse] + [a for a in range(len(spacing)) if a != coarse]


def normalization_for(
    channel_names: Sequence[str], intensities: list[dict[str, float]], median_relative_size: float
) -> list[Normalization]:
    """CT -> clip + dataset z-score; other modalities -> per-image z-score (masked when cropping helped)."""
    use_mask = median_relative_size < MASKED_NORM_MAX_RELATIVE_SIZE
    schemes = []
    for name, stats in zip(channel_names, intensities):
        key = name.strip().lower()
        if key == "ct":
            schemes.append(
                Normalization(
                    "ct",
                    False,
                    stats["mean"],
                    max(stats["std"], 1e-8),
                    stats["percentile_00_5"],
                    stats["percentile_99_5"],
                )
            )
        elif key in ("nonorm", "none"):
            schemes.append(Normalization("none"))
        elif key in ("rescale_to_0_1", "rescale"):
            schemes.append(Normalization("rescale"))
        else:
            schemes.append(Normalization("zscore", use_mask))
    return schemes


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> list[float]:
    """A patch of the reference voxel budget shaped by the spacing, clipped to the median image.

    The median may be fractional (an even case count); it is kept so, as nnU-Net does, and the
    topology pads the clipped patch up to its total stride.
    """
    dims = len(spacing)
    inv = 1 / np.asarray(spacing, dtype=np.float64)
    patch = [round(float(v)) for v in inv * (INITIAL_PATCH_VOXELS[dims] / np.prod(inv)) ** (1 / dims)]
    return [min(p, float(m)) for p, m in zip(patch, median_shape)]


def plan_configuration(
    name: str,
    spacing: Sequence[float],
    median_shape: Sequence[float],
    num_classes: int,
    dataset_voxels: float,
    gpu_memory_gb: float,
    normalization: list[Normalization],
    batch_dice: bool,
    data_identifier: str,
    preset: Preset = DEFAULT_PRESET,
) -> Configuration:
    """Patch, batch size and network for one configuration under the memory budget (of ``preset``).

    ``median_shape`` is the unrounded median at ``spacing`` (it shapes the patch) and
    ``dataset_voxels`` the unrounded voxel count of the dataset at ``spacing`` (it caps the
    batch); the plan stores the median rounded.
    """
    dims = len(spacing)
    spacing = [float(s) for s in spacing]
    topology = derive_topology(spacing, initial_patch(spacing, median_shape))

    def estimate(topo) -> int:
        return estimated_elements(topo, dims, num_classes, preset)

    topology, elements = fit_patch_to_budget(
        name,
        spacing,
        median_shape,
        topology,
        lambda patch: derive_topology(spacing, patch),
        estimate,
        gpu_memory_gb,
        preset.fit_batch or REFERENCE_BATCH[dims],
        preset,
    )
    batch = batch_size_for(dims, elements, topology.patch_size, dataset_voxels, gpu_memory_gb, preset)
    return Configuration(
        name=name,
        dims=dims,
        spacing=spacing,
        patch_size=list(topology.patch_size),
        batch_size=batch,
        median_shape=[int(round(float(m))) for m in median_shape],
        network=network_for(topology, dims, preset),
        normalization=normalization,
        resampling=Resampling(),
        batch_dice=batch_dice,
        data_identifier=data_identifier,
        activation_estimate=int(elements),
    )


def network_for(topology: Topology, dims: int, preset: Preset = DEFAULT_PRESET) -> Network:
    """The preset's network on ``topology``: the plain U-Net, or the residual encoder with one decoder conv."""
    n_stages = len(topology.strides)
    features = features_per_stage(n_stages, dims)
    if preset.architecture == "plain":
        return Network(topology.kernel_sizes, topology.strides, features)
    blocks = list(RESIDUAL_BLOCKS[:n_stages])
    return Network(topology.kernel_sizes, topology.strides, features, 1, 1, "residual_encoder", blocks)


def estimated_elements(topology: Topology, dims: int, num_classes: int, preset: Preset = DEFAULT_PRESET) -> int:
    """Activation elements of one sample through the preset's network (the planners' memory proxy)."""
    network = network_for(topology, dims, preset)
    if network.architecture == "plain":
        return activation_elements(topology.patch_size, topology.strides, network.features_per_stage, num_classes)
    return residual_activation_elements(
        topology.patch_size, topology.strides, network.features_per_stage, num_classes, network.blocks_per_stage
    )


def batch_size_for(
    dims: int,
    elements: int,
    patch_size: Sequence[int],
    dataset_voxels: float,
    gpu_memory_gb: float,
    preset: Preset = DEFAULT_PRESET,
) -> int:
    """As many samples as the activation budget holds, at most 5 % of the dataset's voxels (the default preset;
    the ResEnc presets: all of it), at least 2."""
    batch = round(activation_budget(dims, gpu_memory_gb, preset) / elements * REFERENCE_BATCH[dims])
    cap = round(preset.max_dataset_fraction * dataset_voxels / math.prod(patch_size))
    return int(max(min(batch, cap), MIN_BATCH))


def activation_budget(dims: int, gpu_memory_gb: float, preset: Preset = DEFAULT_PRESET) -> float:
    """Activation elements that ``REFERENCE_BATCH[dims]`` samples may use under ``gpu_memory_gb``."""
    return preset.reference_elements[dims] * gpu_memory_gb / preset.gpu_memory_gb


def fit_patch_to_budget(
    name: str,
    spacing: Sequence[float],
    median_shape: Sequence[float],
    topology: Topology,
    topology_for: Callable[[list[int]], Topology],
    estimate: Callable[[Topology], int],
    gpu_memory_gb: float,
    batch: int,
    preset: Preset = DEFAULT_PRESET,
) -> tuple[Topology, int]:
    """Shrink the patch, one pooling step on its relatively largest axis at a time, until
    ``batch`` samples fit the activation budget. Returns the topology and its elements per sample."""
    dims = len(spacing)
    budget, ref_batch = activation_budget(dims, gpu_memory_gb, preset), REFERENCE_BATCH[dims]
    elements = estimate(topology)
    while elements / ref_batch * batch > budget:
        patch = list(topology.patch_size)
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = len(ratios) - 1 - int(np.argmax(ratios[::-1]))  # ties: the last axis, as nnU-Net
        trial = list(patch)
        trial[axis] -= topology.divisible_by[axis]
        step = topology_for(trial).divisible_by[axis]
        if patch[axis] - step < 2:
            raise PlanError(f"{name}: no patch fits {gpu_memory_gb} GB of GPU memory; raise --gpu-memory")
        patch[axis] -= step
        topology = topology_for(patch)
        elements = estimate(topology)
    return topology, elements


def median_shape_at(spacing: Sequence[float], spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Unrounded median, per axis, of the cases' shapes resampled to ``spacing`` (each rounded first)."""
    new_shapes = np.round(spacings / np.asarray(spacing) * shapes)
    return np.median(new_shapes, axis=0)


def output_label_values(fingerprint: dict[str, Any]) -> dict[str, int]:
    """Training value -> value to write in predictions, inverting the layout's label mapping.

    Where several raw values map to one training value (BraTS 3 and 4 both mean
    enhancing tumour), the one actually seen in the data wins.
    """
    mapping = {int(k): int(v) for k, v in fingerprint.get("label_mapping", {}).items()}
    values = sorted(v for n, v in fingerprint["labels"].items() if n != "ignore")
    if not mapping:
        return {str(v): v for v in values}
    seen = {v for case in fingerprint["cases"].values() for v in case.get("raw_label_values", [])}
    inverse = {}
    for value in values:
        raws = sorted(r for r, t in mapping.items() if t == value)
        preferred = [r for r in raws if r in seen]
        inverse[str(value)] = (preferred or raws)[-1]
    return inverse


def plan_from_fingerprint(
    fingerprint: dict[str, Any],
    gpu_memory_gb: float = REFERENCE_GPU_GB,
    configurations: Sequence[str] | None = None,
    preset: str = "default",
) -> Plan:
    """The whole plan for a dataset; ``configurations`` limits which ones are planned, ``preset`` names the
    planner (:data:`PRESETS`; its configurations keep the standard names here, see :func:`with_presets`)."""
    wanted = _wanted(gpu_memory_gb, configurations)
    cases = fingerprint["cases"]
    if not cases:
        raise PlanError("the fingerprint has no cases")
    spacings = np.array([c["spacing"] for c in cases.values()], dtype=np.float64)
    shapes = np.array([c["shape_after_crop"] for c in cases.values()], dtype=np.float64)
    target = target_spacing(spacings, shapes)
    order = transpose_for(target)
    backward = [int(i) for i in np.argsort(order)]
    spacing_t = [target[a] for a in order]
    median_t = [float(v) for v in median_shape_at(target, spacings, shapes)[order]]  # unrounded, as nnU-Net
    dataset_voxels = float(np.prod(median_t, dtype=np.float64)) * len(cases)
    regions = [Region.from_json(r) for r in fingerprint.get("regions", [])]
    plan_args = {**_plan_args(fingerprint, regions, dataset_voxels, gpu_memory_gb), "preset": preset_named(preset)}
    planned: dict[str, Configuration] = {}
    is_3d = median_t[0] > 1
    fullres = (
        plan_configuration(
            "3d_fullres", spacing_t, median_t, batch_dice=False, data_identifier="3d_fullres", **plan_args
        )
        if is_3d
        else None
    )
    lowres = _plan_lowres(fullres, median_t, len(cases), plan_args) if fullres else None
    if fullres is not None and "3d_fullres" in wanted:
        planned["3d_fullres"] = _replace(fullres, batch_dice=lowres is not None)
    if "2d" in wanted:
        axis0 = spacings[:, order[0]]
        shares_data = is_3d and "3d_fullres" in planned and bool(np.allclose(axis0, spacing_t[0], rtol=1e-3))
        identifier = "3d_fullres" if shares_data else "2d"
        planned["2d"] = plan_configuration(
            "2d", spacing_t[1:], median_t[1:], batch_dice=True, data_identifier=identifier, **plan_args
        )
    if lowres is not None and "3d_lowres" in wanted:
        planned["3d_lowres"] = lowres
    if "3d_lowres" in planned and "3d_fullres" in planned:  # as nnU-Net: the cascade comes with its two stages
        planned[CASCADE] = cascade_of(planned["3d_fullres"], "3d_lowres")
    _refuse_missing(configurations, planned, is_3d, lowres is not None)
    return Plan(
        version=PLAN_VERSION,
        dataset=fingerprint.get("dataset", "dataset"),
        channel_names=list(fingerprint["channel_names"]),
        labels=dict(fingerprint["labels"]),
        regions=regions,
        output_label_values=output_label_values(fingerprint),
        transpose_forward=order,
        transpose_backward=backward,
        original_median_spacing=[float(v) for v in np.median(spacings, axis=0)],
        original_median_shape=[int(round(float(v))) for v in np.median(shapes, axis=0)],
        gpu_memory_gb=float(gpu_memory_gb),
        configurations=planned,
    )


def cascade_of(fullres: Configuration, previous: str) -> Configuration:
    """nnU-Net's ``3d_cascade_fullres``: ``fullres`` (its variant: the same spacing, patch, network and
    preprocessed data) that also reads ``previous``'s predicted mask, one-hot, as extra input channels."""
    return _replace(fullres, name=CASCADE, inherits_from=fullres.name, previous_stage=previous)


def with_presets(
    plan: Plan, fingerprint: dict[str, Any], presets: Sequence[str], configurations: Sequence[str] | None = None
) -> Plan:
    """``plan`` with the configurations of each preset added, named ``<configuration>_<preset>``
    (``3d_fullres_resenc_l``), each planned for its preset's GPU target. A preset configuration whose spacing
    equals the default one's shares its preprocessed data (nnU-Net does the same)."""
    added = dict(plan.configurations)
    for name in presets:
        preset = preset_named(name)
        if preset.name == "default":
            continue
        planned = plan_from_fingerprint(fingerprint, preset.gpu_memory_gb, configurations, preset.name)
        for base, config in planned.configurations.items():
            default = plan.configurations.get(base)
            shares = default is not None and default.spacing == config.spacing
            identifier = default.data_identifier if shares else f"{config.data_identifier}{preset.suffix}"
            added[base + preset.suffix] = _replace(
                config,
                name=base + preset.suffix,
                data_identifier=identifier,
                # a preset's cascade is a variant of the preset's fullres and reads the preset's lowres
                inherits_from=config.inherits_from and config.inherits_from + preset.suffix,
                previous_stage=config.previous_stage and config.previous_stage + preset.suffix,
            )
    return dataclasses.replace(plan, configurations=added)


def _plan_args(
    fingerprint: dict[str, Any], regions: list[Region], dataset_voxels: float, gpu_memory_gb: float
) -> dict[str, Any]:
    """What every configuration is planned with: the class count, the data size, the GPU budget, the normalisation."""
    n_classes = len(regions) if regions else len([n for n in fingerprint["labels"] if n != "ignore"])
    norm = normalization_for(
        fingerprint["channel_names"],
        fingerprint["foreground_intensities"],
        fingerprint["median_relative_size_after_crop"],
    )
    return dict(num_classes=n_classes, dataset_voxels=dataset_voxels, gpu_memory_gb=gpu_memory_gb, normalization=norm)


def _wanted(gpu_memory_gb: float, configurations: Sequence[str] | None) -> set[str]:
    """The configurations to plan; a non-positive GPU budget or an unknown name is refused."""
    if gpu_memory_gb <= 0:
        raise PlanError(f"GPU memory must be positive, got {gpu_memory_gb}")
    wanted = set(configurations or KNOWN_CONFIGURATIONS)
    unknown = wanted - set(KNOWN_CONFIGURATIONS)
    if unknown:
        raise PlanError(f"unknown configuration(s) {sorted(unknown)}; choose from {list(KNOWN_CONFIGURATIONS)}")
    if CASCADE in wanted:  # the cascade is a variant of 3d_fullres that reads 3d_lowres: it needs both
        wanted |= {"3d_fullres", "3d_lowres"}
    return wanted


def _refuse_missing(
    configurations: Sequence[str] | None, planned: dict[str, Configuration], is_3d: bool, has_lowres: bool
) -> None:
    """Configurations asked for by name must apply to the dataset."""
    missing = [c for c in configurations or () if c not in planned]
    if missing:
        applicable = ["2d"] + (["3d_fullres"] if is_3d else []) + (["3d_lowres", CASCADE] if has_lowres else [])
        raise PlanError(
            f"configuration(s) {missing} do not apply to this dataset; it supports {applicable} "
            f"(3d_lowres and {CASCADE} only when the full-resolution patch covers under 25 % of the median image)"
        )


def _plan_lowres(fullres: Configuration, median: list[float], n_cases: int, plan_args: dict) -> Configuration | None:
    """A coarser 3D configuration when the full-resolution patch sees < 25 % of the median image.

    Coverage, the batch cap and the drop rule use the unrounded median shapes (``median`` is
    the full-resolution one); only the shape that sizes the patch is rounded, as nnU-Net does.
    """
    fullres_voxels = float(np.prod(median, dtype=np.float64))
    if math.prod(fullres.patch_size) / fullres_voxels >= LOWRES_PATCH_COVERAGE:
        return None
    spacing = np.asarray(fullres.spacing, dtype=np.float64)
    lowres, lowres_voxels, coverage = None, fullres_voxels, 0.0
    while coverage < LOWRES_PATCH_COVERAGE:
        coarse = spacing.max() / spacing > 2
        spacing = (
            np.where(coarse, spacing * LOWRES_SPACING_STEP, spacing) if coarse.any() else spacing * LOWRES_SPACING_STEP
        )
        shape = np.asarray(fullres.spacing) / spacing * np.asarray(median, dtype=np.float64)
        lowres_voxels = float(np.prod(shape, dtype=np.float64))
        lowres = plan_configuration(
            "3d_lowres",
            list(spacing),
            [round(float(v)) for v in shape],
            batch_dice=False,
            data_identifier="3d_lowres",
            **{**plan_args, "dataset_voxels": lowres_voxels * n_cases},
        )
        coverage = math.prod(lowres.patch_size) / lowres_voxels
    if fullres_voxels / lowres_voxels < 2:
        return None
    return lowres


def _replace(config: Configuration, **changes: Any) -> Configuration:
    return dataclasses.replace(config, **changes)
