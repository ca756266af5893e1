"""Segmentation metrics per label and per region, for arrays and for folders of masks.

Convention (as BraTS): when truth and prediction are both empty, Dice is 1; when only
one is empty, Dice is 0. :func:`evaluate_folders` (``autoseg evaluate``) adds IoU,
precision, recall, volumes, HD95 and ASD from :mod:`autoseg.data.evaluation.metrics`; the definitions are
in docs/evaluation.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.core.errors import DatasetError
from autoseg.core.files import atomic_write_bytes, check_folder_path, read_json, write_json
from autoseg.core.plan import Region, foreground_labels
from autoseg.core.progress import progress_bar
from autoseg.core.tables import table
from autoseg.data.evaluation.lesions import LESION_METRICS, LesionRule, lesion_wise
from autoseg.data.evaluation.metrics import METRICS, dice, image_diagonal_mm, mask_metrics
from autoseg.data.io.datasets import (
    BRATS_LABELS,
    BRATS_MAPPING,
    BRATS_REGIONS,
    is_junk,
    labels_are_name_to_int,
    nnunet_labels,
    remap_labels,
)
from autoseg.data.io.images import ITK_SUFFIXES, read_geometry, read_label, strip_suffix
from autoseg.data.preprocessing.cropping import bounding_box

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1
#: How label values in the files are read: as they are, or BraTS 1/2/4 (or 1/2/3) -> 1 ED, 2 NCR, 3 ET.
LABEL_CONVENTIONS = ("consecutive", "brats")
#: Named region sets, on consecutive values (BraTS: WT = 1|2|3, TC = 2|3, ET = 3).
REGION_PRESETS: dict[str, tuple[Region, ...]] = {
    "brats": tuple(Region(short, r.labels, r.paint_value) for short, r in zip(("WT", "TC", "ET"), BRATS_REGIONS)),
}


def dice_per_class(
    predicted: np.ndarray, truth: np.ndarray, labels: dict[str, int], regions: Sequence[tuple[str, Sequence[int]]] = ()
) -> dict[str, float]:
    """Dice for every foreground label (by name) and every region (union of labels).

    Voxels whose truth is the ``ignore`` label (unannotated) are left out of every score.
    """
    if "ignore" in labels:
        annotated = truth != labels["ignore"]
        predicted, truth = predicted[annotated], truth[annotated]
    scores = {name: dice(predicted == value, truth == value) for name, value in foreground_labels(labels).items()}
    for name, members in regions:
        scores[name] = dice(np.isin(predicted, list(members)), np.isin(truth, list(members)))
    return scores


def mean_scores(per_case: dict[str, dict[str, float]]) -> dict[str, float]:
    names = sorted({n for scores in per_case.values() for n in scores})
    return {n: float(np.mean([s[n] for s in per_case.values() if n in s])) for n in names}


# --------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class ScoredClass:
    """One row group of the results: a single label value or a region (union of values)."""

    name: str
    values: tuple[int, ...]
    kind: str  # "label" or "region"


@dataclass(frozen=True)
class _LabelSpec:
    """What to score, resolved from --labels, --regions and --dataset-json."""

    convention: str
    names: dict[int, str]  # label value -> name; empty: every value found in the truth
    regions: tuple[Region, ...]
    ignore: int | None = None

    @property
    def declared(self) -> bool:
        return bool(self.names)


#: Metrics of a class absent from both masks (Dice 1, distances 0, volumes 0).
BOTH_EMPTY = mask_metrics(np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool), (1.0, 1.0, 1.0))
BOTH_EMPTY_LESIONS = lesion_wise(np.zeros((1, 1, 1), bool), np.zeros((1, 1, 1), bool), (1.0, 1.0, 1.0))


def evaluate_folders(
    *,
    predictions: Path,
    truth: Path,
    labels: str = "consecutive",
    regions: str | None = None,
    output: Path | None = None,
    dataset_json: Path | None = None,
    lesion_rule: LesionRule | None = None,
    show_progress: bool = True,
) -> dict:
    """Score every truth mask against the prediction of the same case id; write and return the summary.

    ``labels``: ``consecutive`` (values as in the files) or ``brats`` (1/2/4 or 1/2/3 mapped to
    1 ED, 2 NCR, 3 ET in both folders). ``regions``: ``brats`` adds WT/TC/ET. ``dataset_json``:
    label names and regions of an nnU-Net v2 or MSD dataset.json. ``output`` (default: the
    predictions folder) receives ``summary.json`` and ``metrics.csv``. ``lesion_rule`` adds the
    BraTS lesion-wise Dice and HD95 (:mod:`autoseg.data.evaluation.lesions`) of every class.
    """
    if labels not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {labels!r}; choose from {', '.join(LABEL_CONVENTIONS)}")
    if regions is not None and regions not in REGION_PRESETS:
        raise ValueError(f"unknown region set {regions!r}; choose from {', '.join(REGION_PRESETS)}")
    predictions, truth = Path(predictions).expanduser().resolve(), Path(truth).expanduser().resolve()
    out = Path(output).expanduser().resolve() if output is not None else predictions
    check_folder_path(out)
    spec = _label_spec(labels, regions, dataset_json)
    pairs = _pair_cases(predictions, truth)
    _check_geometry(pairs)

    per_case, found_in_truth, found_in_pred = _score_cases(pairs, spec, lesion_rule, show_progress)
    classes = _classes(spec, found_in_truth)
    stray = sorted(found_in_pred - {v for c in classes if c.kind == "label" for v in c.values} - {0})
    if stray and not spec.declared:
        log.warning("label value(s) %s occur only in predictions and are not scored", stray)
    absent = BOTH_EMPTY | (BOTH_EMPTY_LESIONS if lesion_rule is not None else {})
    for case_id, scores in per_case.items():
        per_case[case_id] = {c.name: scores.get(c.name, absent) for c in classes}

    metrics = METRICS + (LESION_METRICS if lesion_rule is not None else ())
    summary = _summary(per_case, classes, spec, predictions, truth, metrics, lesion_rule)
    write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "metrics.csv", _csv(summary["cases"], metrics).encode())
    log.info("evaluated %d cases -> %s (summary.json, metrics.csv)", len(per_case), out)
    return summary


def _score_cases(
    pairs: dict[str, tuple[Path, Path]], spec: _LabelSpec, lesion_rule: LesionRule | None, show_progress: bool
) -> tuple[dict[str, dict[str, dict[str, float]]], set[int], set[int]]:
    """Every case's scores and the label values found in the truth and in the predictions; every case that
    cannot be scored is named at once (scoring stops at the first, reading goes on)."""
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    found_in_truth: set[int] = set()
    found_in_pred: set[int] = set()
    problems: list[str] = []
    with progress_bar("Evaluating", len(pairs), show_progress) as advance:
        for case_id, (pred_path, truth_path) in pairs.items():
            try:
                scores, truth_values, pred_values = _score_case(
                    case_id, pred_path, truth_path, spec, score=not problems, lesion_rule=lesion_rule
                )
                per_case[case_id] = scores
                found_in_truth |= truth_values
                found_in_pred |= pred_values
            except _CaseProblem as exc:
                problems.append(str(exc))
            advance(case_id)
    if problems:
        raise DatasetError(problems, header="Cases cannot be evaluated")
    return per_case, found_in_truth, found_in_pred


class _CaseProblem(Exception):
    """A problem of one case, collected so that every bad case is reported at once."""


def _label_spec(convention: str, regions: str | None, dataset_json: Path | None) -> _LabelSpec:
    names: dict[int, str] = {}
    json_regions: tuple[Region, ...] = ()
    ignore = None
    if convention == "brats":
        names = {v: n for n, v in BRATS_LABELS.items() if v > 0}
    if dataset_json is not None:
        names, json_regions, ignore = _read_dataset_json(Path(dataset_json).expanduser())
    chosen = REGION_PRESETS[regions] if regions is not None else json_regions
    clash = sorted(set(names.values()) & {r.name for r in chosen})
    if clash:
        raise DatasetError(f"region name(s) {clash} are also label names; rename them in dataset.json")
    return _LabelSpec(convention, names, chosen, ignore)


def _read_dataset_json(path: Path) -> tuple[dict[int, str], tuple[Region, ...], int | None]:
    """Label names, regions and the ignore value of an nnU-Net v2 or MSD dataset.json."""
    if not path.is_file():
        raise DatasetError(f"dataset.json {path} does not exist")
    try:
        meta = read_json(path)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    raw = meta.get("labels") if isinstance(meta, dict) else None
    problems: list[str] = []
    if labels_are_name_to_int(raw):  # nnU-Net v2: name -> int, or name -> [ints] for regions
        labels, regions = nnunet_labels(meta, problems)
    elif isinstance(raw, dict) and raw and all(str(k).isdigit() for k in raw):  # MSD: "1" -> name
        labels, regions = {str(n): int(v) for v, n in raw.items()}, ()
    else:
        problems.append(f"{path.name}: 'labels' must map names to values (nnU-Net v2) or values to names (MSD)")
        labels, regions = {}, ()
    if problems:
        raise DatasetError(problems, header=f"{path} cannot be used")
    names = {v: n for n, v in foreground_labels(labels).items()}
    return names, tuple(regions), labels.get("ignore")


def _label_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{role} folder {folder} does not exist or is not a folder")
    files: dict[str, Path] = {}
    duplicates = []
    for path in sorted(folder.iterdir()):
        if is_junk(path.name) or not path.is_file() or not path.name.lower().endswith(ITK_SUFFIXES):
            continue
        case_id = strip_suffix(path.name)
        if case_id in files:
            duplicates.append(f"case {case_id}: {files[case_id].name} and {path.name} in the {role} folder")
        files[case_id] = path
    if duplicates:
        raise DatasetError(duplicates, header=f"Two files share a case id in {folder}")
    return files


def _pair_cases(predictions: Path, truth: Path) -> dict[str, tuple[Path, Path]]:
    truths, preds = _label_files(truth, "truth"), _label_files(predictions, "prediction")
    if not truths:
        raise DatasetError(f"no label files (.nii.gz, .nii, .nrrd, .mha, ...) in the truth folder {truth}")
    missing = [f"case {c}: no prediction for {p.name} in {predictions}" for c, p in truths.items() if c not in preds]
    if missing:
        raise DatasetError(missing, header="Predictions are missing")
    extra = sorted(set(preds) - set(truths))
    if extra:
        log.warning("%d prediction(s) without truth are not scored: %s", len(extra), ", ".join(extra[:10]))
    return {c: (preds[c], truths[c]) for c in sorted(truths)}


def _check_geometry(pairs: dict[str, tuple[Path, Path]]) -> None:
    """Compare headers only, so that every mismatched case is reported before any voxel is read."""
    problems = []
    for case_id, (pred_path, truth_path) in pairs.items():
        try:
            mismatches = read_geometry(truth_path).mismatches(read_geometry(pred_path))
        except Exception as exc:  # any reader error (nibabel, SimpleITK) becomes a message naming the case
            problems.append(f"case {case_id}: cannot read the header of {pred_path.name} or {truth_path.name}: {exc}")
            continue
        if mismatches:
            problems.append(
                f"case {case_id}: prediction {pred_path.name} is not on the grid of the truth: " + "; ".join(mismatches)
            )
    if problems:
        raise DatasetError(problems, header="Predictions and truth do not match")


def _values(array: np.ndarray) -> set[int]:
    if array.dtype == np.uint8:
        return {int(v) for v in np.flatnonzero(np.bincount(array.ravel(), minlength=1))}
    return {int(v) for v in np.unique(array)}


def _score_case(
    case_id: str, pred_path: Path, truth_path: Path, spec: _LabelSpec, score: bool, lesion_rule: LesionRule | None
) -> tuple[dict[str, dict[str, float]], set[int], set[int]]:
    arrays, found = [], []
    for role, path in (("prediction", pred_path), ("truth", truth_path)):
        try:
            array, geometry = read_label(path)
        except Exception as exc:
            raise _CaseProblem(f"case {case_id}: cannot read the {role}: {exc}") from exc  # exc names the file
        values = _values(array)
        array, values = _apply_convention(case_id, role, array, values, spec)
        arrays.append(array)
        found.append(values)
    pred, truth = arrays
    pred_values, truth_values = (v - {0} - ({spec.ignore} if spec.ignore is not None else set()) for v in found)
    if not score:  # an earlier case failed: only check this one, the run will stop anyway
        return {}, truth_values, pred_values
    if spec.ignore is not None:
        ignored = truth == spec.ignore
        pred, truth = np.where(ignored, 0, pred), np.where(ignored, 0, truth)
    diagonal = image_diagonal_mm(geometry.shape, geometry.spacing)
    # the margin keeps every lesion's dilation inside the box
    box = bounding_box((pred != 0) | (truth != 0), margin=1 + (lesion_rule.dilation if lesion_rule else 0))
    if box is None:  # nothing anywhere: every class is "both empty"
        return {}, truth_values, pred_values
    pred, truth = pred[box], truth[box]
    label_values = sorted(spec.names) if spec.declared else sorted(pred_values | truth_values)
    masks = {spec.names.get(v, str(v)): (pred == v, truth == v) for v in label_values}
    masks |= {r.name: (np.isin(pred, list(r.labels)), np.isin(truth, list(r.labels))) for r in spec.regions}
    scores = {}
    for name, (pred_mask, truth_mask) in masks.items():
        scores[name] = mask_metrics(pred_mask, truth_mask, geometry.spacing, diagonal_mm=diagonal)
        if lesion_rule is not None:
            scores[name] |= lesion_wise(pred_mask, truth_mask, geometry.spacing, lesion_rule)
    return scores, truth_values, pred_values


def _apply_convention(
    case_id: str, role: str, array: np.ndarray, values: set[int], spec: _LabelSpec
) -> tuple[np.ndarray, set[int]]:
    """Map BraTS values to consecutive ones and refuse values the labels do not declare."""
    if spec.convention == "brats":
        unknown = sorted(values - set(BRATS_MAPPING))
        if unknown:
            raise _CaseProblem(
                f"case {case_id}: the {role} holds value(s) {unknown}; BraTS labels are 0, 1, 2, 4 (or 3 for ET)"
            )
        array, values = remap_labels(array, BRATS_MAPPING, np.uint8), {BRATS_MAPPING[v] for v in values}
    allowed = set(spec.names) | {0} | ({spec.ignore} if spec.ignore is not None else set())
    if spec.declared and not values <= allowed:
        raise _CaseProblem(
            f"case {case_id}: the {role} holds value(s) {sorted(values - allowed)} that the labels "
            f"do not declare (declared: {sorted(allowed)})"
        )
    region_values = {v for r in spec.regions for v in r.labels}
    if spec.regions and not spec.declared and max(values) > max(region_values):
        hint = "; use --labels brats for files with 1/2/4" if spec.convention == "consecutive" else ""
        raise _CaseProblem(
            f"case {case_id}: the {role} holds value(s) {sorted(values - region_values - {0})} "
            f"beyond the regions' labels {sorted(region_values)}{hint}"
        )
    return array, values


def _classes(spec: _LabelSpec, found_in_truth: set[int]) -> list[ScoredClass]:
    values = sorted(spec.names) if spec.declared else sorted(found_in_truth)
    classes = [ScoredClass(spec.names.get(v, str(v)), (v,), "label") for v in values]
    return classes + [ScoredClass(r.name, tuple(r.labels), "region") for r in spec.regions]


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _summary(
    per_case: dict,
    classes: list[ScoredClass],
    spec: _LabelSpec,
    predictions: Path,
    truth: Path,
    metrics: tuple[str, ...],
    lesion_rule: LesionRule | None,
) -> dict:
    mean = {c.name: {m: _mean([s[c.name][m] for s in per_case.values()]) for m in metrics} for c in classes}
    labels_only = [c.name for c in classes if c.kind == "label"]
    foreground = {m: _mean([mean[n][m] for n in labels_only]) for m in metrics}
    return _finite(
        {
            "version": SUMMARY_VERSION,
            "predictions": str(predictions),
            "truth": str(truth),
            "label_convention": spec.convention,
            "classes": {c.name: {"kind": c.kind, "values": list(c.values)} for c in classes},
            "metrics": list(metrics),
            "lesion_rule": dataclasses.asdict(lesion_rule) if lesion_rule is not None else None,
            "num_cases": len(per_case),
            "mean": mean,
            "foreground_mean": foreground,
            "cases": per_case,
        }
    )


def _finite(data: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def _csv(per_case: dict[str, dict[str, dict[str, float | None]]], metrics: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "class", *metrics])
    for case_id, scores in per_case.items():
        for name, values in scores.items():
            writer.writerow([case_id, name, *("" if values[m] is None else f"{values[m]:.6g}" for m in metrics)])
    return buffer.getvalue()


THREE_DIGITS = ("dice", "iou", "precision", "recall", "lesion_dice")
HEADERS = {
    "dice": "Dice",
    "iou": "IoU",
    "precision": "precision",
    "recall": "recall",
    "hd95_mm": "HD95 mm",
    "asd_mm": "ASD mm",
    "pred_volume_ml": "pred ml",
    "true_volume_ml": "true ml",
    "lesion_dice": "Dice",
    "lesion_hd95_mm": "HD95 mm",
    "lesions_matched": "found",
    "lesions_missed": "missed",
    "lesions_false_positive": "false positive",
}


def summary_tables(summary: dict) -> list:
    """What ``autoseg evaluate`` prints: rich Tables of the mean of every metric per class, the
    lesion-wise metrics (with ``--lesion-wise``) in a table of their own."""
    lesion = [m for m in summary["metrics"] if m in LESION_METRICS]
    tables = [
        _table(summary, [m for m in summary["metrics"] if m not in lesion], f"Mean over {summary['num_cases']} cases")
    ]
    if lesion:
        tables.append(_table(summary, lesion, f"Lesion-wise (BraTS), mean over {summary['num_cases']} cases"))
    return tables


def _table(summary: dict, metrics: list[str], title: str) -> Any:
    def cells(values: dict) -> list[str]:
        return ["-" if values[m] is None else f"{values[m]:.{3 if m in THREE_DIGITS else 2}f}" for m in metrics]

    rows = [[name, *cells(values)] for name, values in summary["mean"].items()]
    if sum(c["kind"] == "label" for c in summary["classes"].values()) > 1:
        rows.append(["[italic]labels mean[/]", *cells(summary["foreground_mean"])])
    return table(title, ["class", *(HEADERS.get(m, m) for m in metrics)], rows, right=range(1, len(metrics) + 1))
