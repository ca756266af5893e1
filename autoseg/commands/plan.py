"""``autoseg plan`` as a Python function: validate, fingerprint, plan, split, preprocess."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from autoseg.core.errors import OptionError, PlanError, WorkspaceError
from autoseg.core.files import read_json, write_json
from autoseg.core.parallel import WorkerPeak
from autoseg.core.plan import Plan, load_plan, save_plan
from autoseg.core.workspace import DatasetWorkspace, dataset_workspace, find_dataset
from autoseg.data.io.dataset_record import dataset_record, load_dataset_record
from autoseg.data.io.datasets import DatasetSpec, discover_dataset
from autoseg.data.io.dicom_seg import dataset_code_overrides
from autoseg.data.io.splits import fold_problems, splits_document, updated_splits
from autoseg.data.preprocessing.fingerprint import (
    compute_fingerprint,
    content_hash,
    dataset_warnings,
    load_fingerprint,
    save_fingerprint,
)
from autoseg.data.preprocessing.pipeline import preprocess_configurations
from autoseg.deploy.archive import model_source
from autoseg.planning.adoption import plan_like
from autoseg.planning.planner import PRESETS, REFERENCE_GPU_GB, plan_from_fingerprint, preset_named, with_presets

log = logging.getLogger(__name__)


@dataclass
class PlanReport:
    """What ``plan_dataset`` did, with timings for benchmarks."""

    workspace: DatasetWorkspace
    spec: DatasetSpec
    plan: Plan
    fingerprint_reused: bool
    preprocessed: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    peak_worker_rss_bytes: int = 0
    peak_worker_work_bytes: int = 0
    #: doubtful but valid properties of the data (logged as warnings): see ``dataset_warnings``.
    warnings: list[str] = field(default_factory=list)


def _refuse_another_dataset_over_trained_models(workspace: DatasetWorkspace, spec: DatasetSpec) -> None:
    """Two datasets with one folder name would share a work folder entry: keep trained models safe."""
    if not workspace.dataset_json.is_file() or not any(workspace.root.glob("models/*/fold_*/checkpoint_*.pt")):
        return
    previous = load_dataset_record(workspace.dataset_json)
    if (previous.channel_names, previous.labels) != (spec.channel_names, spec.labels):
        raise WorkspaceError(
            f"{workspace.root} holds models trained on another dataset named {spec.name} (channels "
            f"{list(previous.channel_names)}, labels {previous.labels}; this one has {list(spec.channel_names)}, "
            f"{spec.labels}); plan it into another work folder (-w) or rename its folder"
        )


def _splits_to_write(workspace: DatasetWorkspace, spec: DatasetSpec) -> dict | None:
    """New splits for a new dataset, existing ones kept stable (see :mod:`autoseg.data.io.splits`); None: keep the file.

    Computed before anything is written, so a bad ``splits_final.json`` leaves the work folder untouched.
    """
    case_ids = [c.case_id for c in spec.cases]
    fresh = splits_document(case_ids, spec.root)
    existing = read_json(workspace.splits) if workspace.splits.is_file() else None
    if (
        existing is None
        or fresh["source"] == "splits_final.json"
        or fold_problems(existing.get("folds"))
        or len(existing["folds"]) < 2
    ):
        return fresh  # new, shipped by the dataset, unusable, or too few cases for folds before
    document, added, removed = updated_splits(existing, case_ids)
    if any(not fold["val"] for fold in document["folds"]):
        log.warning(
            "splits.json was made anew: after %d case(s) were removed a fold had no validation case left; "
            "train every fold again with --no-resume",
            len(removed),
        )
        return fresh
    if added or removed:
        log.warning(
            "splits.json kept its folds: %d new case(s) went to the validation sets of the smallest folds, "
            "%d removed case(s) were dropped; folds trained before this change did not see the new "
            "cases (`autoseg train --fold K --continue` goes on from their final weights with the new "
            "cases)",
            len(added),
            len(removed),
        )
        return document
    return None


def plan_dataset(
    *,
    dataset_dir: Path,
    workdir: Path,
    workers: int = 1,
    gpu_memory_gb: float = REFERENCE_GPU_GB,
    configurations: Sequence[str] | None = None,
    preprocess: bool = True,
    force: bool = False,
    show_progress: bool = True,
    like: Path | None = None,
    presets: Sequence[str] = (),
    channel_map: dict[str, str] | None = None,
) -> PlanReport:
    """Validate and fingerprint the dataset, derive and save the plan, write splits, preprocess.

    Nothing is written until every case has been read and checked. A fingerprint whose content hash matches
    the data is reused unless ``force``; preprocessing skips cases already done for an unchanged configuration.
    ``like``: a trained model whose network topology and spacing the plan adopts, ``channel_map`` its channels'
    filters (:mod:`autoseg.planning.adoption`); ``presets``: planner presets whose configurations join the plan.
    """
    timings: dict[str, float] = {}
    peak = WorkerPeak()
    start = time.perf_counter()
    model = _like_model(like, configurations, channel_map, presets)
    spec = discover_dataset(dataset_dir, keep_case_problems=True)
    codes = dataset_code_overrides(spec.root)
    workspace = dataset_workspace(workdir, spec.name)
    _refuse_another_dataset_over_trained_models(workspace, spec)
    data_hash = content_hash(spec, workers, show_progress)
    timings["hash_s"] = time.perf_counter() - start

    start = time.perf_counter()
    fingerprint = None if force or spec.problems else _reusable_fingerprint(workspace, data_hash)
    reused = fingerprint is not None
    if fingerprint is None:
        fingerprint = compute_fingerprint(spec, workers, show_progress, data_hash, peak)
    timings["fingerprint_s"] = time.perf_counter() - start

    start = time.perf_counter()
    presets = tuple(presets) or (() if model is not None else _planned_presets(workspace))
    plan, adoption_warnings = _derive_plan(
        fingerprint, gpu_memory_gb, configurations, model, like, presets, channel_map
    )
    plan = _keep_custom_configurations(plan, workspace)
    timings["plan_s"] = time.perf_counter() - start
    _write_documents(workspace, spec, codes, None if reused else fingerprint, plan)

    report = PlanReport(
        workspace, spec, plan, reused, timings=timings, warnings=_doubts(spec, fingerprint) + adoption_warnings
    )
    for warning in report.warnings:
        log.warning(warning)
    if preprocess:
        start = time.perf_counter()
        report.preprocessed = preprocess_configurations(workspace, spec, plan, workers, show_progress, peak)
        timings["preprocess_s"] = time.perf_counter() - start
    report.peak_worker_rss_bytes = peak.bytes
    report.peak_worker_work_bytes = peak.above_idle_bytes
    return report


def _write_documents(
    workspace: DatasetWorkspace, spec: DatasetSpec, codes: dict, fingerprint: dict | None, plan: Plan
) -> None:
    """dataset.json, fingerprint.json (None: the reused one stays), plans.json and, when due, splits.json."""
    splits = _splits_to_write(workspace, spec)
    workspace.root.mkdir(parents=True, exist_ok=True)
    write_json(workspace.dataset_json, dataset_record(spec) | codes)
    if fingerprint is not None:
        save_fingerprint(workspace.fingerprint, fingerprint)
    save_plan(workspace.plans, plan)
    if splits is not None:
        write_json(workspace.splits, splits)
    log.info("wrote %s", workspace.plans)


def _derive_plan(
    fingerprint: dict,
    gpu_memory_gb: float,
    configurations: Sequence[str] | None,
    model: tuple[Plan, list[str]] | None,
    like: Path | None,
    presets: Sequence[str],
    channel_map: dict[str, str] | None,
) -> tuple[Plan, list[str]]:
    """The plan from the fingerprint (with the presets' configurations), or adopted from ``model`` (its
    channels' filters mapped by ``channel_map``); and the adoption's warnings."""
    if model is not None:
        return plan_like(model[0], fingerprint, str(like), gpu_memory_gb, model[1], channel_map)
    plan = plan_from_fingerprint(fingerprint, gpu_memory_gb, configurations)
    return with_presets(plan, fingerprint, presets, configurations), []


def _planned_presets(workspace: DatasetWorkspace) -> tuple[str, ...]:
    """The presets of the plan already in the work folder: planning again keeps them (re-planned on the new data)."""
    if not workspace.plans.is_file():
        return ()
    try:
        names = list(load_plan(workspace.plans).configurations)
    except PlanError:
        return ()
    return tuple(p.name for p in PRESETS.values() if p.suffix and any(n.endswith(p.suffix) for n in names))


def _check_presets(presets: Sequence[str], like: Path | None) -> None:
    """An unknown preset, or presets with --like, are refused before any work."""
    for name in presets:
        preset_named(name)
    if presets and like is not None:
        raise OptionError("--preset plans its own networks; --like adopts a model's: give one of them")


def _like_model(
    like: Path | None,
    configurations: Sequence[str] | None,
    channel_map: dict[str, str] | None,
    presets: Sequence[str] = (),
) -> tuple[Plan, list[str]] | None:
    """The model ``--like`` names (None without it); ``--channel-map`` needs one, ``--preset`` excludes one."""
    _check_presets(presets, like)
    if channel_map and like is None:
        raise OptionError("--channel-map maps channels onto a model's: give the model with --like", "--channel-map")
    return _model_to_plan_like(like, configurations) if like is not None else None


def parse_channel_map(values: Sequence[str] | None) -> dict[str, str]:
    """``--channel-map CT=FLAIR`` (repeatable, or comma-separated): this dataset's channel -> the model's."""
    pairs = [v.strip() for value in values or () for v in value.split(",") if v.strip()]
    mapping: dict[str, str] = {}
    for pair in pairs:
        new, _, model = pair.partition("=")
        if not new.strip() or not model.strip():
            raise OptionError(f"{pair!r} is not NEW=MODEL (e.g. CT=FLAIR)", "--channel-map")
        if new.strip() in mapping:
            raise OptionError(f"{new.strip()!r} is mapped twice", "--channel-map")
        mapping[new.strip()] = model.strip()
    return mapping


def _model_to_plan_like(model: Path, configurations: Sequence[str] | None) -> tuple[Plan, list[str]]:
    """The model's plan and the configurations to adopt: those named (the model must have them), else the
    model's trained ones (an exported model: the exported ones), else, for a model not trained yet, all."""
    with tempfile.TemporaryDirectory(prefix="autoseg-like-") as scratch:
        source = model_source(model, Path(scratch))
        workspace = find_dataset(source.workdir, source.dataset)
        plan = load_plan(workspace.plans)
        trained = [c for c in plan.configurations if workspace.trained_folds(c, source.checkpoint or "final")]
    if configurations:
        return plan, list(configurations)
    if source.configuration is not None:
        return plan, [source.configuration]
    return plan, trained or list(plan.configurations)


def _doubts(spec: DatasetSpec, fingerprint: dict) -> list[str]:
    """The data's doubtful properties, and a dataset too small for cross-validation."""
    doubts = dataset_warnings(fingerprint)
    if len(spec.cases) < 2:
        doubts.append(
            f"the dataset has {len(spec.cases)} case: too few for cross-validation, so splits.json holds "
            "no fold; only `autoseg train --fold all` is possible, and its Dice is measured on its own "
            "training case, not on held-out data"
        )
    return doubts


def _reusable_fingerprint(workspace: DatasetWorkspace, data_hash: str) -> dict | None:
    if not workspace.fingerprint.is_file():
        return None
    try:
        fingerprint = load_fingerprint(workspace.fingerprint)
    except PlanError:
        return None
    return fingerprint if fingerprint.get("content_hash") == data_hash else None


def _keep_custom_configurations(plan: Plan, workspace: DatasetWorkspace) -> Plan:
    """Re-planning keeps configurations added later (e.g. tuned ones) that still have their base (and, for a
    cascade stage, their previous stage)."""
    if not workspace.plans.is_file():
        return plan
    try:
        old = load_plan(workspace.plans)
    except PlanError:
        return plan
    extra = {
        n: c
        for n, c in old.configurations.items()
        if c.inherits_from
        and n not in plan.configurations
        and c.inherits_from in plan.configurations
        and (c.previous_stage is None or c.previous_stage in plan.configurations)
    }
    return dataclasses.replace(plan, configurations={**plan.configurations, **extra}) if extra else plan


def summary(report: PlanReport) -> list:
    """What ``plan`` prints: the dataset, its labels, the median geometry and a table of the configurations
    (rich renderables and lines for :func:`autoseg.core.tables.print_tables`)."""
    from autoseg.core.tables import table
    from autoseg.model.network import network_parameters

    spec, plan = report.spec, report.plan
    labels = ", ".join(f"{v} {n}" for n, v in plan.labels.items() if v > 0)
    regions = f"; regions {', '.join(r.name for r in plan.regions)}" if plan.regions else ""
    rows = []
    for name, c in plan.configurations.items():
        norm = ", ".join(sorted({n.scheme + ("+mask" if n.use_mask else "") for n in c.normalization}))
        parameters = network_parameters(plan, c)
        rows.append(
            [
                name,
                _fmt(c.spacing),
                _fmt(c.median_shape),
                _fmt(c.patch_size),
                str(c.batch_size),
                str(c.network.n_stages),
                f"{parameters / 1e6:.1f} M",
                norm,
            ]
        )
    columns = ["config", "spacing (mm)", "median shape", "patch", "batch", "stages", "parameters", "normalisation"]
    return [
        f"[bold]{spec.name}[/] ({spec.layout} layout): {len(spec.cases)} cases, "
        f"channels {', '.join(spec.channel_names)}",
        f"labels: {labels}{regions}",
        f"median spacing {_fmt(plan.original_median_spacing)} mm, median shape after crop "
        f"{_fmt(plan.original_median_shape)}" + (" (fingerprint reused)" if report.fingerprint_reused else ""),
        *(
            [f"network and spacing taken from {like.source} (dataset {like.dataset}, plan {like.plan_digest})"]
            if (like := plan.planned_like) is not None
            else []
        ),
        table("Configurations", columns, rows),
        f"work folder: {report.workspace.root}",
    ]


def _fmt(values) -> str:
    return "×".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)
