"""``autoseg import`` of a model trained by nnU-Net v2: a results folder or the zip of ``nnUNetv2_export_model_to_zip``.

nnU-Net writes, per trained model, ``DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` with
``plans.json``, ``dataset.json``, ``dataset_fingerprint.json``, ``fold_<k>/checkpoint_final.pth`` and,
after ``nnUNetv2_find_best_configuration``, ``crossval_results_folds_*/postprocessing.json``. The import
turns that into an autoseg work folder of the same dataset::

    plans.json        the nnU-Net configuration mapped onto autoseg's plan schema (spacing, patch,
                      network, normalisation with the fingerprint's CT statistics, resampling orders,
                      the trainer's mirror axes), with ``imported_from`` set
    dataset.json      channels, labels, regions (``regions_class_order`` as paint values); no cases
    fingerprint.json  the training cases' spacings and shapes, for predict's QC flags
    inference.json    the folds and nnU-Net's post-processing (from postprocessing.json, never the .pkl)
    models/<configuration>/fold_<k>/checkpoint_final.pt   the weights, renamed to autoseg's modules

Nothing is unpickled: a checkpoint is read with ``torch.load(weights_only=True)`` and an explicit
allow-list of the numpy scalar types nnU-Net's training log holds. What autoseg cannot reproduce (another
network class, a normalisation scheme, a resampling function, a cascade stage, weights that do not fit
the network) is refused by name before anything is written; the work folder is written to a temporary
folder beside its place and moved there whole at the end.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from autoseg.core.errors import CheckpointError, PlanError, WorkspaceError
from autoseg.core.files import read_json_or_raise, write_json
from autoseg.core.plan import (
    PLAN_VERSION,
    Configuration,
    ImportedModel,
    Network,
    Normalization,
    Plan,
    Region,
    Resampling,
    save_plan,
)
from autoseg.core.workspace import DatasetWorkspace

#: nnU-Net's network classes autoseg rebuilds -> ``network.architecture``.
NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "plain",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "residual_encoder",
}
#: nnU-Net's normalisation schemes -> autoseg's.
NORMALIZATION = {
    "ZScoreNormalization": "zscore",
    "CTNormalization": "ct",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale",
}
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
#: the files of a model folder the import reads (anything else in a zip is not extracted).
_NEEDED = re.compile(
    r"(plans\.json|dataset\.json|dataset_fingerprint\.json|fold_[^/]+/checkpoint_final\.pth"
    r"|crossval_results_folds_[^/]+/postprocessing\.json)"
)


def is_nnunet_model(path: Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 results folder (dataset or model folder) or an exported zip of one."""
    path = Path(path)
    if path.is_dir():
        return _is_model_folder(path) or bool(_model_folders(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        return "autoseg-model.json" not in names and any(n.endswith("/plans.json") for n in names)
    return False


def _is_model_folder(path: Path) -> bool:
    """nnU-Net's plans.json (it names its plans; autoseg's does not) beside a dataset.json."""
    import json

    if not (path / "plans.json").is_file() or not (path / "dataset.json").is_file():
        return False
    try:
        plans = json.loads((path / "plans.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(plans, dict) and "plans_name" in plans and "configurations" in plans


def _model_folders(dataset_folder: Path) -> list[Path]:
    return sorted(p for p in dataset_folder.iterdir() if p.is_dir() and _is_model_folder(p))


def model_folder(path: Path) -> Path:
    """The ``Trainer__Plans__configuration`` folder ``path`` names (itself, or the only one in a dataset folder)."""
    if _is_model_folder(path):
        return path
    found = _model_folders(path)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise WorkspaceError(
            f"{path} holds {len(found)} nnU-Net model folders ({names}); give one Trainer__Plans__configuration folder"
        )
    return found[0]


def extract_nnunet_zip(archive: Path, destination: Path) -> Path:
    """Extract the files the import reads from an ``nnUNetv2_export_model_to_zip`` archive; returns the model folder.

    Member names are checked before anything is written (no absolute path, no ``..``, no link), and the
    archive must hold exactly one model folder."""
    with zipfile.ZipFile(archive) as zf:
        wanted = []
        for info in zf.infolist():
            path = PurePosixPath(info.filename)
            if (
                info.filename.startswith(("/", "\\"))
                or "\\" in info.filename
                or (len(info.filename) > 1 and info.filename[1] == ":")
                or ".." in path.parts
                or (info.external_attr >> 16) & 0o170000 == 0o120000
            ):
                raise WorkspaceError(f"{archive}: member {info.filename!r} is unsafe; refusing to extract this archive")
            if len(path.parts) >= 3 and _NEEDED.fullmatch("/".join(path.parts[2:])):
                wanted.append(info)
        folders = sorted({"/".join(PurePosixPath(i.filename).parts[:2]) for i in wanted})
        if len(folders) != 1:
            raise WorkspaceError(
                f"{archive} holds {len(folders)} nnU-Net model folders ({', '.join(folders) or 'none'}); "
                "export one configuration per zip (nnUNetv2_export_model_to_zip -c CONFIGURATION)"
            )
        for info in wanted:
            target = destination / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
    return destination / folders[0]


# --------------------------------------------------------------------------- checkpoint


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net ``checkpoint_*.pth`` read without unpickling: tensors, plain data and numpy scalars only."""
    import pickle

    import numpy as np
    import torch

    allowed = [np.dtype, _numpy_scalar(), *[getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]]
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        holds = f" (it holds the Python object {found[1]})" if found else ""
        raise CheckpointError(
            f"{path} holds more than weights and plain data{holds}, so it was not loaded: autoseg never unpickles"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("network_weights"), dict):
        raise CheckpointError(f"{path} is not an nnU-Net v2 checkpoint (it has no network_weights)")
    return payload


def _numpy_scalar() -> Any:
    """numpy's scalar reconstructor (``numpy._core`` in numpy 2, ``numpy.core`` before)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar


_KEY_RULES = (
    (re.compile(r"^encoder\.stem\.convs\.0\."), "stem."),
    (re.compile(r"^encoder\.stages\.(\d+)\.blocks\."), r"encoder.\1."),
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\."), r"encoder.\1."),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\."), r"decoder.\1."),
    (re.compile(r"^decoder\.transpconvs\."), "upsample."),
    (re.compile(r"^decoder\.seg_layers\."), "heads."),
    (re.compile(r"\.conv\.(weight|bias)$"), r".0.\1"),
    (re.compile(r"\.norm\.(weight|bias)$"), r".1.\1"),
)


def autoseg_key(name: str) -> str | None:
    """The autoseg module key of an nnU-Net state-dict key; None for the duplicates nnU-Net's modules register
    (``all_modules``, the decoder's reference to the encoder)."""
    if ".all_modules." in name or name.startswith("decoder.encoder."):
        return None
    for pattern, replacement in _KEY_RULES:
        name = pattern.sub(replacement, name)
    return name


def convert_weights(weights: dict[str, Any], plan: Plan, configuration: str, source: str) -> dict[str, Any]:
    """nnU-Net's weights under autoseg's names, checked against the network the plan builds (strict)."""
    from autoseg.model.network import build_network

    converted = {}
    for name, tensor in weights.items():
        key = autoseg_key(name)
        if key is not None:
            converted[key] = tensor.detach().clone().float()
    network = build_network(plan.configuration(configuration), len(plan.channel_names), plan.num_classes)
    try:
        network.load_state_dict(converted)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        problem = lines[1].strip() if len(lines) > 1 else str(exc)
        raise CheckpointError(
            f"{source}: the weights do not fit the network its plans.json describes ({problem[:300]}); "
            "its trainer builds another network, which autoseg cannot reproduce"
        ) from None
    return converted


# --------------------------------------------------------------------------- plan


def resolved_configuration(plans: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """nnU-Net's configuration ``name`` with its ``inherits_from`` chain merged (the child's keys win)."""
    configurations = plans.get("configurations") or {}
    if name not in configurations:
        raise PlanError(f"{where}: no configuration {name!r} (it has {sorted(configurations)})")
    config = dict(configurations[name])
    seen = {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configurations:
            raise PlanError(f"{where}: configuration {name!r} inherits from {parent!r}, which cannot be resolved")
        seen.add(parent)
        config = {**configurations[parent], **config}
    if config.get("previous_stage"):
        raise PlanError(
            f"{where}: configuration {name!r} is a cascade stage (it needs the predictions of "
            f"{config['previous_stage']!r}); autoseg does not import cascades yet"
        )
    return config


def _network(config: dict[str, Any], where: str) -> Network:
    architecture = config.get("architecture") or {}
    cls = architecture.get("network_class_name")
    if cls not in NETWORKS:
        raise PlanError(
            f"{where}: network {cls!r} cannot be reproduced; autoseg imports "
            f"{' and '.join(n.rsplit('.', 1)[1] for n in NETWORKS)} models"
        )
    kw = architecture.get("arch_kwargs") or {}
    problems = []
    if not kw.get("conv_bias", False):
        problems.append("convolutions without bias")
    if "InstanceNorm" not in str(kw.get("norm_op")):
        problems.append(f"norm_op {kw.get('norm_op')}")
    if kw.get("dropout_op"):
        problems.append(f"dropout_op {kw.get('dropout_op')}")
    if "LeakyReLU" not in str(kw.get("nonlin")) or (kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01) != 0.01:
        problems.append(f"nonlin {kw.get('nonlin')} {kw.get('nonlin_kwargs')}")
    if kw.get("block", "BasicBlockD").rsplit(".", 1)[-1] != "BasicBlockD" or kw.get("stem_channels") not in (
        None,
        (kw.get("features_per_stage") or [None])[0],
    ):
        problems.append(f"block {kw.get('block')} / stem_channels {kw.get('stem_channels')}")
    decoder = list(kw.get("n_conv_per_stage_decoder") or [2])
    encoder = list(kw.get("n_conv_per_stage") or [2]) if NETWORKS[cls] == "plain" else [1]
    if len(set(decoder)) != 1 or len(set(encoder)) != 1:
        problems.append(f"convolutions per stage that vary between stages ({encoder}, {decoder})")
    if problems:
        raise PlanError(f"{where}: a network with {'; '.join(problems)} cannot be reproduced by autoseg")
    residual = NETWORKS[cls] == "residual_encoder"
    return Network(
        kernel_sizes=[list(map(int, k)) for k in kw["kernel_sizes"]],
        strides=[list(map(int, s)) for s in kw["strides"]],
        features_per_stage=[int(f) for f in kw["features_per_stage"]],
        convs_per_stage_encoder=encoder[0],
        convs_per_stage_decoder=decoder[0],
        architecture=NETWORKS[cls],
        blocks_per_stage=[int(b) for b in kw["n_blocks_per_stage"]] if residual else None,
    )


def _normalization(config: dict[str, Any], plans: dict[str, Any], channels: int, where: str) -> list[Normalization]:
    schemes, masks = config.get("normalization_schemes") or [], config.get("use_mask_for_norm") or []
    if len(schemes) != channels or len(masks) != channels:
        raise PlanError(f"{where}: {len(schemes)} normalisation scheme(s) for {channels} channel(s)")
    stats = plans.get("foreground_intensity_properties_per_channel") or {}
    result = []
    for c, (scheme, use_mask) in enumerate(zip(schemes, masks)):
        if scheme not in NORMALIZATION:
            raise PlanError(
                f"{where}: normalisation scheme {scheme!r} (channel {c}) cannot be reproduced; autoseg knows "
                f"{', '.join(NORMALIZATION)}"
            )
        if NORMALIZATION[scheme] != "ct":
            result.append(Normalization(NORMALIZATION[scheme], use_mask=bool(use_mask)))
            continue
        s = stats.get(str(c))
        if not s:
            raise PlanError(
                f"{where}: CTNormalization of channel {c} needs its foreground intensities, which are missing"
            )
        result.append(
            Normalization(
                "ct", False, float(s["mean"]), float(s["std"]), float(s["percentile_00_5"]), float(s["percentile_99_5"])
            )
        )
    return result


def _resampling(config: dict[str, Any], where: str) -> Resampling:
    kwargs = {}
    for kind in ("data", "seg", "probabilities"):
        function = config.get(f"resampling_fn_{kind}")
        if function != RESAMPLING_FUNCTION:
            raise PlanError(
                f"{where}: resampling function {function!r} ({kind}) cannot be reproduced; autoseg reproduces "
                f"{RESAMPLING_FUNCTION}"
            )
        kwargs[kind] = config.get(f"resampling_fn_{kind}_kwargs") or {}
        if kwargs[kind].get("force_separate_z") is not None:
            raise PlanError(f"{where}: force_separate_z={kwargs[kind]['force_separate_z']} ({kind}) is not supported")
    coarse = {int(k.get("order_z", 0)) for k in kwargs.values()}
    if len(coarse) != 1:
        raise PlanError(f"{where}: order_z differs between data, labels and probabilities ({sorted(coarse)})")
    return Resampling(
        image_order=int(kwargs["data"].get("order", 3)),
        label_order=int(kwargs["seg"].get("order", 1)),
        probabilities_order=int(kwargs["probabilities"].get("order", 1)),
        coarse_axis_order=coarse.pop(),
    )


def labels_and_regions(dataset_json: dict[str, Any], where: str) -> tuple[dict[str, int], list[Region]]:
    """autoseg's labels (name -> consecutive value) and regions from nnU-Net's ``labels`` (and
    ``regions_class_order``: the value each region paints, later regions over earlier ones)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or "background" not in labels:
        raise PlanError(f"{where}: labels must name background and the classes")
    foreground = {k: v for k, v in labels.items() if k not in ("background", "ignore")}
    if not any(isinstance(v, list) and len(v) > 1 for v in foreground.values()):
        return {str(k): int(v) for k, v in labels.items()}, []
    order = dataset_json.get("regions_class_order")
    if not isinstance(order, list) or len(order) != len(foreground):
        raise PlanError(f"{where}: a region model needs regions_class_order with one value per region")
    regions = [
        Region(str(name), [int(v) for v in (value if isinstance(value, list) else [value])], int(paint))
        for (name, value), paint in zip(foreground.items(), order)
    ]
    values = sorted({v for r in regions for v in r.labels} | {int(v) for v in order})
    named = {"background": 0, **{f"label {v}": v for v in values if v != 0}}
    if "ignore" in labels:
        named["ignore"] = int(labels["ignore"])
    return named, regions


def nnunet_plan(
    plans: dict[str, Any], dataset_json: dict[str, Any], name: str, mirror_axes: list[int] | None, origin: ImportedModel
) -> Plan:
    """autoseg's plan for nnU-Net configuration ``name`` (its only configuration)."""
    where = f"{origin.source} (plans.json)"
    config = resolved_configuration(plans, name, where)
    channel_names = [
        str(v) for _, v in sorted((dataset_json.get("channel_names") or {}).items(), key=lambda kv: int(kv[0]))
    ]
    if not channel_names:
        raise PlanError(f"{origin.source} (dataset.json): channel_names is missing")
    labels, regions = labels_and_regions(dataset_json, f"{origin.source} (dataset.json)")
    patch = [int(p) for p in config["patch_size"]]
    configuration = Configuration(
        name=name,
        dims=len(patch),
        spacing=[float(s) for s in config["spacing"]],
        patch_size=patch,
        batch_size=int(config["batch_size"]),
        median_shape=[int(round(v)) for v in config["median_image_size_in_voxels"]],
        network=_network(config, where),
        normalization=_normalization(config, plans, len(channel_names), where),
        resampling=_resampling(config, where),
        batch_dice=bool(config.get("batch_dice", False)),
        data_identifier=str(config.get("data_identifier", name)),
        activation_estimate=0,
        mirror_axes=mirror_axes,
    )
    values = sorted(v for k, v in labels.items() if k != "ignore")
    return Plan(
        version=PLAN_VERSION,
        dataset=str(plans.get("dataset_name") or dataset_json.get("name") or "imported"),
        channel_names=channel_names,
        labels=labels,
        regions=regions,
        output_label_values={str(v): v for v in values},
        transpose_forward=[int(a) for a in plans["transpose_forward"]],
        transpose_backward=[int(a) for a in plans["transpose_backward"]],
        original_median_spacing=[float(v) for v in plans["original_median_spacing_after_transp"]],
        original_median_shape=[int(round(v)) for v in plans["original_median_shape_after_transp"]],
        gpu_memory_gb=8.0,
        configurations={name: configuration},
        imported_from=origin,
    )


# --------------------------------------------------------------------------- the other documents


def _fingerprint(fingerprint: dict[str, Any], plan: Plan, dataset_json: dict[str, Any]) -> dict[str, Any]:
    """autoseg's fingerprint.json from nnU-Net's dataset_fingerprint.json (no case names: they are not in it)."""
    from autoseg.data.preprocessing.fingerprint import FINGERPRINT_VERSION

    stats = fingerprint.get("foreground_intensity_properties_per_channel") or {}
    keys = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
    return {
        "version": FINGERPRINT_VERSION,
        "dataset": plan.dataset,
        "source": "",
        "layout": "nnunet",
        "content_hash": "",
        "channel_names": plan.channel_names,
        "labels": plan.labels,
        "label_mapping": {},
        "regions": [r.__dict__ for r in plan.regions],
        "cases": {
            f"case_{i:04d}": {"spacing": [float(v) for v in spacing], "shape_after_crop": [int(v) for v in shape]}
            for i, (spacing, shape) in enumerate(zip(fingerprint["spacings"], fingerprint["shapes_after_crop"]))
        },
        "foreground_intensities": [
            {k: float(stats[str(c)][k]) for k in keys if k in stats.get(str(c), {})}
            for c in range(len(plan.channel_names))
        ],
        "median_relative_size_after_crop": float(fingerprint.get("median_relative_size_after_cropping", 1.0)),
    }


def _dataset_record(plan: Plan) -> dict[str, Any]:
    from autoseg.data.io.dataset_record import DATASET_RECORD_VERSION

    return {
        "version": DATASET_RECORD_VERSION,
        "name": plan.dataset,
        "source": "",
        "layout": "nnunet",
        "channel_names": plan.channel_names,
        "labels": plan.labels,
        "label_mapping": {},
        "regions": [r.__dict__ for r in plan.regions],
        "cases": {},
    }


def postprocessing_steps(document: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """nnU-Net's postprocessing.json as autoseg's steps: each ``remove_all_but_largest_component_from_segmentation``
    keeps the largest component of the union of its labels (or regions); any other function is refused."""
    functions = document.get("postprocessing_fns")
    kwargs = document.get("postprocessing_kwargs")
    if not isinstance(functions, list) or not isinstance(kwargs, list) or len(functions) != len(kwargs):
        raise PlanError(f"{where}: postprocessing_fns and postprocessing_kwargs must be lists of one length")
    steps = []
    for function, arguments in zip(functions, kwargs):
        if function != "remove_all_but_largest_component_from_segmentation":
            raise PlanError(f"{where}: post-processing function {function!r} cannot be reproduced")
        if (arguments or {}).get("background_label", 0) != 0:
            raise PlanError(f"{where}: post-processing with a background label other than 0 cannot be reproduced")
        targets = arguments["labels_or_regions"]
        targets = targets if isinstance(targets, list) else [targets]
        values = sorted({int(v) for t in targets for v in (t if isinstance(t, list) else [t])})
        steps.append({"kind": "largest_component", "values": values})
    return steps


def _postprocessing(folder: Path, folds: list[str]) -> list[dict[str, Any]] | None:
    """The steps of the ``crossval_results_folds_*`` of exactly the imported folds (else of the only one)."""
    found = {p.parent.name: p for p in folder.glob("crossval_results_folds_*/postprocessing.json")}
    wanted = "crossval_results_folds_" + "_".join(folds)
    path = found.get(wanted) or (next(iter(found.values())) if len(found) == 1 else None)
    if path is None:
        return None
    return postprocessing_steps(_document(path), str(path))


def _inference_json(configuration: str, folds: list[str], steps: list[dict[str, Any]]) -> dict[str, Any]:
    from autoseg.inference.instructions import INFERENCE_VERSION

    return {
        "version": INFERENCE_VERSION,
        "configurations": [configuration],
        "folds": {configuration: [int(f) for f in folds]},
        "checkpoint": "final",
        "postprocessing": steps,
        "source": "nnU-Net's postprocessing.json (crossval_results_folds_*)",
    }


# --------------------------------------------------------------------------- the import


def _document(path: Path) -> dict[str, Any]:
    data = read_json_or_raise(path, PlanError, "nnU-Net's")
    if not isinstance(data, dict):
        raise PlanError(f"nnU-Net's {path} is not a JSON object")
    return data


def _folds(folder: Path) -> list[str]:
    trained = [p.name.removeprefix("fold_") for p in folder.glob("fold_*") if (p / "checkpoint_final.pth").is_file()]
    numbered = sorted((f for f in trained if f.isdigit()), key=int)
    folds = numbered or (["all"] if "all" in trained else [])
    if not folds:
        raise WorkspaceError(f"{folder} has no fold_<k>/checkpoint_final.pth; train the model to the end first")
    return folds


def _origin(folder: Path, plans: dict[str, Any], checkpoint: dict[str, Any], source: Path) -> ImportedModel:
    parts = folder.name.split("__")
    init = checkpoint.get("init_args") if isinstance(checkpoint.get("init_args"), dict) else {}
    configuration = str(init.get("configuration") or (parts[2] if len(parts) == 3 else ""))
    if not configuration:
        raise PlanError(f"{folder}: cannot tell which configuration was trained (folder Trainer__Plans__configuration)")
    return ImportedModel(
        tool="nnU-Net v2",
        source=str(source),
        trainer=str(checkpoint.get("trainer_name") or parts[0]),
        plans_name=str(plans.get("plans_name") or (parts[1] if len(parts) == 3 else "")),
        configuration=configuration,
    )


def _mirror_axes(checkpoint: dict[str, Any]) -> list[int]:
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return [] if axes is None else [int(a) for a in axes]


def convert_model_folder(folder: Path, source: Path, destination: Path) -> Plan:
    """Write the work folder of nnU-Net model ``folder`` into ``destination`` (a dataset folder); returns its plan."""
    from autoseg.core.checkpoint import CHECKPOINT_VERSION, save_checkpoint

    plans, dataset_json = _document(folder / "plans.json"), _document(folder / "dataset.json")
    folds = _folds(folder)
    first = load_nnunet_checkpoint(folder / f"fold_{folds[0]}" / "checkpoint_final.pth")
    origin = _origin(folder, plans, first, source)
    try:
        plan = nnunet_plan(plans, dataset_json, origin.configuration, _mirror_axes(first), origin)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PlanError(
            f"{folder}: plans.json or dataset.json is not nnU-Net v2's ({type(exc).__name__}: {exc})"
        ) from None
    config = plan.configuration(origin.configuration)
    workspace = DatasetWorkspace(destination)
    for fold in folds:
        path = folder / f"fold_{fold}" / "checkpoint_final.pth"
        checkpoint = first if fold == folds[0] else load_nnunet_checkpoint(path)
        if _mirror_axes(checkpoint) != config.mirror_axes:
            raise CheckpointError(
                f"{path}: its mirror axes differ from fold {folds[0]}'s; the folds are of different trainers"
            )
        weights = convert_weights(checkpoint["network_weights"], plan, origin.configuration, str(path))
        payload = {
            "weights": weights,
            "epoch": int(checkpoint.get("current_epoch") or 0),
            "settings": {"imported_from": origin.tool, "trainer": origin.trainer},
            "configuration": {"name": origin.configuration},
        }
        save_checkpoint(workspace.checkpoint(origin.configuration, fold), {"version": CHECKPOINT_VERSION, **payload})
    save_plan(workspace.plans, plan)
    write_json(workspace.dataset_json, _dataset_record(plan))
    if (folder / "dataset_fingerprint.json").is_file():
        fingerprint = _document(folder / "dataset_fingerprint.json")
        write_json(workspace.fingerprint, _fingerprint(fingerprint, plan, dataset_json))
    steps = _postprocessing(folder, folds)
    if steps is not None and folds != ["all"]:
        write_json(workspace.inference, _inference_json(origin.configuration, folds, steps))
    return plan


def _unpacked(archive: Path, destination: Path) -> Path:
    try:
        return extract_nnunet_zip(archive, destination)
    except (OSError, zipfile.BadZipFile) as exc:
        raise WorkspaceError(f"cannot read nnU-Net model archive {archive}: {exc}") from exc


def import_nnunet(
    *,
    source: Path,
    workdir: Path,
    overwrite: bool = False,
    prepare: Callable[[DatasetWorkspace], None] | None = None,
) -> DatasetWorkspace:
    """Install an nnU-Net v2 model (results folder or exported zip) into ``workdir``; nothing is written
    there unless the whole model converts and ``prepare`` (run on the converted dataset folder before it is
    installed, e.g. to preprocess the model's training data) succeeds."""
    source = Path(source).expanduser()
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".import-") as staging:
        staging = Path(staging)
        folder = _unpacked(source, staging / "zip") if source.is_file() else model_folder(source.resolve())
        plans = _document(folder / "plans.json")
        name = str(plans.get("dataset_name") or "")
        if not name or PurePosixPath(name).name != name or name in (".", ".."):
            raise PlanError(f"{folder / 'plans.json'}: invalid dataset_name {name!r}")
        target = workdir / name
        if (target / "plans.json").is_file() and not overwrite:
            raise WorkspaceError(
                f"{target} already holds dataset {name}; import into another --workdir or pass --overwrite"
            )
        convert_model_folder(folder, source, staging / "out" / name)
        if prepare is not None:
            prepare(DatasetWorkspace(staging / "out" / name))
        if target.exists():
            target.rename(staging / "replaced")
        (staging / "out" / name).rename(target)
    return DatasetWorkspace(target)
