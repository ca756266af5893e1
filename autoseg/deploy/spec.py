"""``deployment.json``: everything a runtime outside autoseg needs to reproduce a prediction.

``autoseg export`` writes it beside one ONNX model per fold (:mod:`autoseg.inference.onnx_export`).
Every number comes from the plan, ``inference.json`` and the constants the prediction code
itself uses (never restated by hand), so the spec cannot drift from what ``autoseg predict``
does; the rules that are code rather than numbers are named by identifiers that
docs/deployment.md defines one by one. A reader must refuse a ``version`` it does not know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Configuration, Plan
from autoseg.core.version import __version__
from autoseg.data.evaluation.postprocessing import Step, step_to_json
from autoseg.data.preprocessing.normalization import MIN_STD
from autoseg.data.preprocessing.restore import REGION_THRESHOLD, class_names
from autoseg.inference.backends import INT8_SUFFIX
from autoseg.inference.fold_ensemble import DEFAULT_STEP
from autoseg.inference.onnx_export import BATCH_AXIS, INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx, weights_digest
from autoseg.inference.sliding_window import SIGMA_SCALE

DEPLOYMENT_VERSION = 1
DEPLOYMENT_FORMAT = "autoseg-deployment"
SPEC_NAME = "deployment.json"
#: configuration, fold, the fold's fp32 ONNX model -> (its accepted INT8 model or None, the check's record)
Quantiser = Callable[[str, str, bytes], tuple[bytes | None, dict]]


def onnx_file(configuration: str, fold: str, checkpoint: str) -> str:
    """Where a fold's ONNX model lies, relative to the spec (beside the fold's checkpoint)."""
    return f"models/{configuration}/fold_{fold}/checkpoint_{checkpoint}.onnx"


def int8_file(configuration: str, fold: str, checkpoint: str) -> str:
    """Where a fold's accepted INT8 model lies, relative to the spec (beside the fp32 one)."""
    return f"models/{configuration}/fold_{fold}/checkpoint_{checkpoint}{INT8_SUFFIX}"


def _preprocessing(plan: Plan, config: Configuration) -> dict[str, Any]:
    resampling = dataclasses.asdict(config.resampling)
    return {
        "transpose_forward": plan.transpose_forward,
        "crop": {"rule": "nonzero_any_channel_bbox", "mask": "nonzero_any_channel_holes_filled"},
        "normalization": [
            {"channel": name, **dataclasses.asdict(scheme)}
            for name, scheme in zip(plan.channel_names, config.normalization)
        ],
        "normalization_min_std": MIN_STD,
        "resampling": {
            "target_spacing": config.spacing,
            "target_spacing_rule": "plan" if config.dims == 3 else "case_first_axis_then_plan",
            "shape_rule": "round_half_even_min_1",
            "grid": "pixel_centres",
            "boundary": "nearest",
            "separate_axis_rule": "coarsest_unique_axis_if_anisotropic_current_else_target",
            **resampling,
        },
    }


def _model_entry(
    plan: Plan, config: Configuration, fold: str, checkpoint: str, digest: str, int8: dict | None
) -> dict[str, Any]:
    entry = {
        "fold": fold,
        "checkpoint": checkpoint,
        "file": onnx_file(config.name, fold, checkpoint),
        "weights_digest": digest,
        "opset": ONNX_OPSET,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "input_shape": [BATCH_AXIS, len(plan.channel_names), *config.patch_size],
        "output_shape": [BATCH_AXIS, plan.num_classes, *config.patch_size],
    }
    if int8 is not None:  # export --int8: the check's record, and the file when it was accepted
        entry["int8"] = {**({"file": int8_file(config.name, fold, checkpoint)} if int8["accepted"] else {}), **int8}
    return entry


def _prediction(
    plan: Plan,
    config: Configuration,
    folds: Sequence[str],
    checkpoint: str,
    digests: Mapping[str, str],
    int8: Mapping[str, dict],
) -> dict[str, Any]:
    return {
        "sliding_window": {
            "patch_size": config.patch_size,
            "step": DEFAULT_STEP,
            "tile_starts": "evenly_spaced_ceil",
            "padding": "zeros_centred_to_patch",
            "gaussian_sigma_scale": SIGMA_SCALE,
            "blending": "gaussian_weighted_mean",
            # an imported nnU-Net model blends with nnU-Net's kernel (sliding_window.nnunet_gaussian)
            **({"gaussian_kernel": "nnunet_filtered_impulse_float16"} if plan.imported_from is not None else {}),
        },
        "mirroring": {
            "axes": list(range(config.dims)) if config.mirror_axes is None else list(config.mirror_axes),
            "variants": "every_subset",
        },
        "activation": "sigmoid" if plan.regions else "softmax",
        # an imported nnU-Net model averages as nnU-Net does: the logits, then one activation
        "ensemble": "mean_of_logits_over_folds_and_mirrors"
        if plan.imported_from is not None
        else "mean_of_activations_over_folds_and_mirrors",
        "models": [_model_entry(plan, config, fold, checkpoint, digests[fold], int8.get(fold)) for fold in folds],
    }


def deployment_spec(
    plan: Plan,
    folds: Mapping[str, Sequence[str]],
    checkpoint: str,
    postprocessing: Sequence[Step],
    digests: Mapping[str, Mapping[str, str]],
    temperature: float = 1.0,
    int8: Mapping[str, Mapping[str, dict]] | None = None,
) -> dict[str, Any]:
    """The spec of a model made of ``folds`` (configuration -> its folds) at ``checkpoint``.

    ``digests``: configuration -> fold -> :func:`weights_digest` of the exported weights;
    ``int8``: configuration -> fold -> the record of its INT8 check (:mod:`autoseg.deploy.int8`).
    """
    configurations, int8 = [], int8 or {}
    for name, chosen in folds.items():
        config = plan.configuration(name)
        configurations.append(
            {
                "name": name,
                "dims": config.dims,
                **_preprocessing(plan, config),
                **_prediction(plan, config, chosen, checkpoint, digests[name], int8.get(name, {})),
                "transpose_backward": plan.transpose_backward,
            }
        )
    return {
        "format": DEPLOYMENT_FORMAT,
        "version": DEPLOYMENT_VERSION,
        "autoseg_version": __version__,
        "dataset": plan.dataset,
        "input": {
            "channels": [{"index": i, "name": n} for i, n in enumerate(plan.channel_names)],
            "array_axes": "channel_then_voxel_axes_reversed",
            "dtype": "float32",
        },
        "configurations": configurations,
        "configuration_ensemble": "mean_of_input_grid_probabilities",
        "output": {
            "classes": class_names(plan),
            "regions": [dataclasses.asdict(r) for r in plan.regions],
            "region_threshold": REGION_THRESHOLD,
            "argmax_ties": "lowest_index",
            "outside_crop": "background",
            "label_names": plan.labels,
            "label_values": plan.output_label_values,
        },
        "postprocessing": {
            "applies_to": "consecutive_labels_on_input_grid",
            "connectivity": "full",
            "steps": [step_to_json(s) for s in postprocessing],
        },
        "calibration": {
            "temperature": temperature,
            "applies_to": "saved_probabilities_only",
            "rule": "softmax(log(p) / T) over classes; sigmoid(logit(p) / T) per region",
        },
    }


def deployment_members(
    plan: Plan,
    weights: Mapping[str, Mapping[str, Mapping]],
    checkpoint: str,
    postprocessing: Sequence[Step],
    temperature: float = 1.0,
    quantiser: Quantiser | None = None,
) -> dict[str, bytes]:
    """The archive members of a deployable model, relative to the dataset folder: one ONNX model per fold
    (with a ``quantiser``, also each accepted INT8 model) and the spec. ``weights``: configuration -> fold ->
    state dict."""
    from autoseg.core.files import dumps

    members, digests, int8 = {}, {}, {}
    for name, per_fold in weights.items():
        config = plan.configuration(name)
        if config.previous_stage is not None:  # archive.export_model refuses it first, with the way out
            raise WorkspaceError(f"{name} is a cascade stage: deployment.json cannot describe it")
        digests[name], int8[name] = {}, {}
        for fold, state in per_fold.items():
            model = export_onnx(state, config, len(plan.channel_names), plan.num_classes)
            members[onnx_file(name, fold, checkpoint)] = model
            digests[name][fold] = weights_digest(state)
            if quantiser is not None:
                quantised, int8[name][fold] = quantiser(name, fold, model)
                if quantised is not None:
                    members[int8_file(name, fold, checkpoint)] = quantised
    spec = deployment_spec(
        plan,
        {c: list(f) for c, f in weights.items()},
        checkpoint,
        postprocessing,
        digests,
        temperature,
        int8 if quantiser is not None else None,
    )
    members[SPEC_NAME] = dumps(spec).encode()
    return members
