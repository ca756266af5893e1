"""``autoseg select``: choose the configuration or ensemble, then its post-processing, on cross-validation.

1. Pool each configuration's cross-validation probabilities (every fold validated).
2. Score every configuration and every ensemble of two or more (probabilities averaged,
   labels painted by the predictor's own code) by mean foreground Dice against the raw labels.
3. Choose the best; on a tie the simpler model (fewer members, then plan order) wins.
4. Decide post-processing on the chosen model's pooled predictions (:mod:`.decide`).
5. Fit the chosen model's temperature on the same predictions (:mod:`autoseg.data.qc.calibration`).
6. Check whether bf16 may stand in for fp32 on CPUs that have it, and OpenVINO for torch on CPUs
   (:mod:`.precision`).
7. Write ``inference.json``, which ``autoseg predict`` follows.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from autoseg.core.errors import WorkspaceError
from autoseg.core.files import write_json
from autoseg.core.plan import Plan, load_plan
from autoseg.core.progress import progress_bar
from autoseg.core.workspace import DatasetWorkspace, find_dataset
from autoseg.data.evaluation.postprocessing import step_to_json
from autoseg.data.io.dataset_record import load_dataset_record
from autoseg.data.io.datasets import DatasetSpec
from autoseg.data.io.images import read_label
from autoseg.data.io.splits import read_splits
from autoseg.data.preprocessing.restore import paint_labels
from autoseg.data.qc.calibration import (
    Samples,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    sample_voxels,
)
from autoseg.data.qc.uncertainty import estimated_dice, structures_of
from autoseg.inference.instructions import INFERENCE_VERSION
from autoseg.selection.crossval import CrossValidation, load_probabilities, pool
from autoseg.selection.decide import CaseResult, crop_case, decide_postprocessing
from autoseg.selection.precision import bf16_check, openvino_check
from autoseg.selection.scoring import Score, case_dice, summarize

log = logging.getLogger(__name__)
Candidate = tuple[str, ...]
#: Voxels drawn per case (near the structures) to fit and measure calibration; the seed makes it repeatable.
CALIBRATION_VOXELS_PER_CASE = 20_000
CALIBRATION_SEED = 0


def select_model(
    *,
    workdir: Path,
    dataset: str | None = None,
    configurations: Sequence[str] | None = None,
    ensembles: bool = True,
    postprocessing: bool = True,
    show_progress: bool = True,
) -> dict:
    """Choose, decide, write ``inference.json`` and return its content.

    ``configurations``: those to compare (each must have every fold validated); default:
    every configuration of the plan with a trained fold, skipping incomplete ones with a warning.
    """
    workspace = find_dataset(workdir, dataset)
    plan = load_plan(workspace.plans)
    spec = load_dataset_record(workspace.dataset_json)
    splits = read_splits(workspace.splits, workspace.name)
    pooled = _pool_all(workspace, plan, splits, configurations, spec)
    candidates = [
        tuple(c) for r in range(1, (len(pooled) if ensembles else 1) + 1) for c in itertools.combinations(pooled, r)
    ]
    scores = _score_candidates(candidates, pooled, plan, spec, show_progress)
    best = max(scores[c].mean for c in candidates)
    chosen = next(c for c in candidates if scores[c].mean >= best)  # candidates go from simple to complex
    log.info("selected %s (mean foreground Dice %.4f)", " + ".join(chosen), scores[chosen].mean)
    cases, samples, dice_pairs = _chosen_results(chosen, pooled, plan, spec, show_progress)
    decisions = decide_postprocessing(cases, plan, show_progress=show_progress) if postprocessing else []
    steps = [d.step for d in decisions if d.adopted]
    final = next((d.after for d in reversed(decisions) if d.adopted), scores[chosen])
    document = {
        "version": INFERENCE_VERSION,
        "dataset": workspace.name,
        "configurations": list(chosen),
        "folds": {c: list(pooled[c].folds) for c in chosen},
        "checkpoint": "final",
        "postprocessing": [step_to_json(s) for s in steps],
        "metric": "mean foreground Dice",
        "classes": plan.scored_classes,
        "num_cases": len(spec.cases),
        "candidates": [{"configurations": list(c), **scores[c].to_json()} for c in candidates],
        "selected": scores[chosen].to_json(),
        "postprocessing_decisions": [d.to_json() for d in decisions],
        "final": final.to_json(),
        "calibration": calibration_report(samples),
        "estimated_dice": quality_estimate(dice_pairs),
        "bf16": bf16_check(workspace, plan, {c: pooled[c].folds for c in chosen}, splits),
        "openvino": openvino_check(workspace, plan, {c: pooled[c].folds for c in chosen}, splits),
    }
    write_json(workspace.inference, document)
    log.info("wrote %s", workspace.inference)
    return document


def _pool_all(
    workspace: DatasetWorkspace, plan: Plan, splits: list[dict], configurations: Sequence[str] | None, spec: DatasetSpec
) -> dict[str, CrossValidation]:
    case_ids = sorted(c.case_id for c in spec.cases)
    explicit = configurations is not None
    if explicit:
        names = list(dict.fromkeys(configurations))
        for name in names:
            plan.configuration(name)
    else:
        names = [c for c in plan.configurations if (workspace.root / "models" / c).is_dir()]
        if not names:
            raise WorkspaceError(
                f"no trained configuration in {workspace.root / 'models'}; run `autoseg train` for every fold first"
            )
    pooled, problems = {}, []
    for name in names:
        cv, missing = pool(workspace, name, splits, case_ids)
        if cv is not None:
            pooled[name] = cv
        problems += missing
    if problems and (explicit or not pooled):
        raise WorkspaceError("cross-validation is incomplete:\n" + "\n".join(f"  - {p}" for p in problems))
    for problem in problems:
        log.warning("skipped: %s", problem)
    return pooled


def _truth(spec: DatasetSpec, case_id: str) -> tuple[np.ndarray, tuple[float, ...]]:
    case = next(c for c in spec.cases if c.case_id == case_id)
    raw, geometry = read_label(case.label)
    return spec.consecutive_labels(raw), geometry.spacing


def _cases(
    members: Sequence[str],
    pooled: dict[str, CrossValidation],
    plan: Plan,
    spec: DatasetSpec,
    title: str,
    show_progress: bool,
) -> Iterator[tuple[str, np.ndarray, tuple[float, ...], dict[str, np.ndarray]]]:
    """Each case's truth, spacing and the ``members``' pooled probabilities, one case in memory at a time.

    ``select`` walks the cases twice: once over every configuration to score the candidates, then
    over the chosen members only, for post-processing, calibration and the estimated Dice. The
    chosen model is known only once every case is scored, and keeping what the second walk
    collects (cropped label maps, calibration voxels) for every candidate until then would
    multiply select's largest resident data by the number of candidates (2^n - 1 for n
    configurations). Reading the chosen members' ``.npz`` files again costs at most the first
    walk's reads and no memory.
    """
    case_ids = sorted(c.case_id for c in spec.cases)
    with progress_bar(title, len(case_ids), show_progress) as advance:
        for case_id in case_ids:
            truth, spacing = _truth(spec, case_id)
            yield (
                case_id,
                truth,
                spacing,
                {
                    name: load_probabilities(pooled[name].probabilities[case_id], plan, truth.shape, case_id)
                    for name in members
                },
            )
            advance(case_id)


def _mean_channels(candidate: Candidate, probabilities: dict[str, np.ndarray]) -> Iterator[np.ndarray]:
    """The members' mean probabilities (float32), one channel at a time: the one averaging path of select.

    A channel at a time keeps scoring at one float32 channel beyond the loaded probabilities;
    the painted labels are the predictor's own (:func:`paint_labels`).
    """
    first = probabilities[candidate[0]]
    for k in range(first.shape[0]):
        channel = first[k].astype(np.float32)
        for name in candidate[1:]:
            channel += probabilities[name][k]
        channel /= len(candidate)
        yield channel


def _score_candidates(
    candidates: list[Candidate], pooled: dict[str, CrossValidation], plan: Plan, spec: DatasetSpec, show_progress: bool
) -> dict[Candidate, Score]:
    per_case: dict[Candidate, list[dict]] = {c: [] for c in candidates}
    for _, truth, _, probabilities in _cases(list(pooled), pooled, plan, spec, "Scoring models", show_progress):
        for candidate in candidates:
            labels = paint_labels(_mean_channels(candidate, probabilities), truth.shape, plan.regions)
            per_case[candidate].append(case_dice(labels, truth, plan))
    return {c: summarize(scores, plan) for c, scores in per_case.items()}


def _chosen_results(
    chosen: Candidate, pooled: dict[str, CrossValidation], plan: Plan, spec: DatasetSpec, show_progress: bool
) -> tuple[list[CaseResult], list[Samples], dict[str, list[tuple]]]:
    """The chosen model's cross-validation labels per case (for post-processing), voxel samples of its
    probabilities near the structures (for calibration), and per structure the (estimated, true) Dice of
    every case (for the quality estimate)."""
    cases, samples = [], []
    structures = structures_of(plan)
    dice_pairs: dict[str, list[tuple]] = {name: [] for name in structures}
    rng = np.random.default_rng(CALIBRATION_SEED)
    regions = [list(r.labels) for r in plan.regions] or None
    for case_id, truth, spacing, probabilities in _cases(
        chosen, pooled, plan, spec, "Collecting predictions", show_progress
    ):
        # whole, not per channel: painting, the estimated Dice and calibration each read every channel
        average = np.empty((len(probabilities[chosen[0]]), *truth.shape), np.float32)
        for k, channel in enumerate(_mean_channels(chosen, probabilities)):
            average[k] = channel
        del probabilities
        labels = paint_labels(average, average.shape[1:], plan.regions)
        cases.append(crop_case(case_id, labels, truth, spacing))
        true = case_dice(labels, truth, plan)
        for name, (channel, values) in structures.items():
            dice_pairs[name].append((estimated_dice(average[channel], np.isin(labels, values)), true[name]))
        drawn = sample_voxels(
            average, truth, regions, labels, rng, CALIBRATION_VOXELS_PER_CASE, ignore=plan.labels.get("ignore")
        )
        if drawn is not None:
            samples.append(drawn)
    return cases, samples, dice_pairs


def quality_estimate(dice_pairs: dict[str, list[tuple]]) -> dict:
    """How well the estimated Dice (:func:`autoseg.data.qc.uncertainty.estimated_dice`) predicts the real one on
    cross-validation: per structure the Spearman rank correlation over cases and the mean absolute error."""
    from scipy.stats import spearmanr

    out = {}
    for name, pairs in dice_pairs.items():
        estimated, true = np.array(pairs, dtype=np.float64).T
        varied = len(pairs) > 2 and np.ptp(estimated) > 0 and np.ptp(true) > 0
        out[name] = {
            "spearman": float(spearmanr(estimated, true).statistic) if varied else None,
            "mean_absolute_error": float(np.mean(np.abs(estimated - true))),
            "cases": len(pairs),
        }
    return out


def calibration_report(per_case: list[Samples]) -> dict | None:
    """The temperature to predict with (fitted on every case) and the calibration it buys.

    "after" is measured honestly: the cases are split in two halves and each half is scored
    with the temperature fitted on the other, so the single fitted number is never scored on
    the voxels it was fitted to.
    """
    if not per_case:
        return None
    everything = Samples.join(per_case)
    halves = [Samples.join(per_case[i::2]) for i in range(2)] if len(per_case) > 1 else [everything] * 2
    crossed = [fit_temperature(halves[1 - i]) for i in range(2)]

    def measured(metric) -> dict[str, float]:
        before = metric(everything)
        after = float(np.mean([metric(halves[i], crossed[i]) for i in range(2)]))
        return {"before": before, "after": after}

    return {
        "temperature": fit_temperature(everything),
        "voxels": int(everything.probabilities.shape[1]),
        "ece": measured(expected_calibration_error),
        "brier": measured(brier_score),
        "nll": measured(negative_log_likelihood),
    }


def summary(document: dict) -> list:
    """What ``select`` prints: the candidates, the post-processing and calibration tables when there are
    any, the quality estimate and the choice (renderables and lines for :func:`autoseg.core.tables.print_tables`)."""
    from autoseg.selection.report import calibration_table, candidates_table, postprocessing_table, quality_line

    parts = [candidates_table(document)]
    if document["postprocessing_decisions"]:
        parts.append(postprocessing_table(document))
    if document["calibration"] is not None:
        parts.append(calibration_table(document))
    return parts + [
        quality_line(document),
        f"selected {' + '.join(document['configurations'])}: mean foreground Dice "
        f"{document['selected']['mean_dice']:.4f}, {document['final']['mean_dice']:.4f} after "
        f"{len(document['postprocessing'])} post-processing step(s); `autoseg predict` follows "
        "inference.json",
    ]
