"""Decide post-processing greedily on the pooled cross-validation predictions of the chosen model.

Steps are tried in this order, each on top of the ones already adopted:

1. the largest connected component of all foreground: adopted when the mean foreground
   Dice improves and no class gets worse (nnU-Net's rule);
2. the largest component of each class (label, or region for region tasks), when there
   are several classes: adopted when that class's Dice improves and the mean does not drop;
3. brain-tumour tasks: region tasks whose last region lies inside the one before (BraTS:
   enhancing tumour inside tumour core), and label tasks with an enhancing-tumour and a
   non-enhancing/necrotic core label (MSD Task01): relabel enhancing tumour as core when
   its volume in the case is below a threshold chosen from :data:`RELABEL_VOLUMES_MM3`
   (the best mean; the smallest threshold on a tie); adopted when the mean improves.

"Improves" is strict: a step that changes nothing, or only ties, is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.core.plan import Plan, foreground_labels
from autoseg.core.progress import progress_bar
from autoseg.data.evaluation.postprocessing import LargestComponent, RelabelSmall, Step, step_to_json
from autoseg.data.preprocessing.cropping import bounding_box
from autoseg.selection.scoring import Score, case_dice, foreground_values, summarize

#: Candidate thresholds (mm³; voxels at 1 mm) of the relabel rule. BraTS 2020 searched 0..750 voxels.
RELABEL_VOLUMES_MM3 = (10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 500.0, 750.0, 1000.0)


@dataclass(frozen=True)
class CaseResult:
    """A case's predicted and true consecutive labels, cropped to the box around both foregrounds.

    The crop is exact for every step and score here: connected components and volumes live
    inside the prediction's foreground, and Dice only counts foreground voxels.
    """

    case_id: str
    prediction: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, ...]


def crop_case(case_id: str, prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> CaseResult:
    box = bounding_box((prediction > 0) | (truth > 0), margin=1)
    if box is None:
        box = tuple(slice(0, 1) for _ in prediction.shape)
    return CaseResult(case_id, prediction[box].copy(), truth[box].copy(), tuple(float(s) for s in spacing))


@dataclass(frozen=True)
class Decision:
    """One step tried: whether it was adopted and the pooled Dice without and with it."""

    description: str
    step: Step
    adopted: bool
    before: Score
    after: Score
    #: relabel rule only: threshold (mm³) -> mean foreground Dice with it.
    thresholds: dict[float, float] | None = None

    def to_json(self) -> dict:
        data = {
            "description": self.description,
            "step": step_to_json(self.step),
            "adopted": self.adopted,
            "before": self.before.to_json(),
            "after": self.after.to_json(),
        }
        if self.thresholds is not None:
            data["thresholds_mm3"] = {f"{t:g}": m for t, m in self.thresholds.items()}
        return data


def decide_postprocessing(
    cases: Sequence[CaseResult], plan: Plan, volumes: Sequence[float] = RELABEL_VOLUMES_MM3, show_progress: bool = True
) -> list[Decision]:
    """Every step tried, in order, with its verdict; the adopted ones are the post-processing."""
    current = [c.prediction for c in cases]
    score = _score(current, cases, plan)
    classes = plan.scored_classes
    trials = _component_steps(plan)
    relabel = _relabel_pair(plan)
    decisions = []
    with progress_bar("Post-processing", len(trials) + (relabel is not None), show_progress) as advance:
        for description, step, improves in trials:
            trial = [step.apply(p, c.spacing) for p, c in zip(current, cases)]
            after = _score(trial, cases, plan)
            adopted = improves(score, after, classes)
            decisions.append(Decision(description, step, adopted, score, after))
            if adopted:
                current, score = trial, after
            advance()
        if relabel is not None:
            decisions.append(_decide_relabel(*relabel, volumes, current, cases, plan, score))
            advance()
    return decisions


def _score(predictions: Sequence[np.ndarray], cases: Sequence[CaseResult], plan: Plan) -> Score:
    return summarize([case_dice(p, c.truth, plan) for p, c in zip(predictions, cases)], plan)


def _foreground_rule(before: Score, after: Score, classes: list[str]) -> bool:
    return after.mean > before.mean and all(after.dice[c] >= before.dice[c] for c in classes)


def _class_rule(name: str) -> Callable[[Score, Score, list[str]], bool]:
    def improves(before: Score, after: Score, classes: list[str]) -> bool:
        return after.dice[name] > before.dice[name] and after.mean >= before.mean

    return improves


def _component_steps(plan: Plan) -> list[tuple[str, Step, Callable]]:
    foreground = foreground_values(plan)
    steps: list[tuple[str, Step, Callable]] = [
        ("largest component of the foreground", LargestComponent(foreground), _foreground_rule)
    ]
    if plan.regions:
        per_class = [(r.name, tuple(sorted(r.labels))) for r in plan.regions]
    else:
        per_class = [(n, (v,)) for n, v in foreground_labels(plan.labels).items()]
    if len(per_class) > 1:  # a class covering all foreground (BraTS whole tumour) repeats the first step
        steps += [
            (f"largest component of {name}", LargestComponent(values), _class_rule(name))
            for name, values in per_class
            if values != foreground
        ]
    return steps


def _relabel_pair(plan: Plan) -> tuple[str, int, int] | None:
    """(description, source, target) values of the relabel rule, or None where it does not apply.

    Region plans: the last region inside the one before (BraTS: enhancing tumour in tumour
    core), painted values. Label plans (MSD Task01): an enhancing-tumour label and a
    non-enhancing/necrotic core label, recognised by name.
    """
    if plan.regions:
        if len(plan.regions) < 2:
            return None
        inner, outer = plan.regions[-1], plan.regions[-2]
        if not set(inner.labels) < set(outer.labels):
            return None
        return f"{inner.name} -> {outer.name} when small", inner.paint_value, outer.paint_value
    names = foreground_labels(plan.labels)
    core = [n for n in names if re.search(r"non[- _]?enhancing|necro|\bncr\b", n, re.I)]
    enhancing = [n for n in names if re.search(r"enhancing", n, re.I) and n not in core]
    if len(core) != 1 or len(enhancing) != 1:
        return None
    return f"{enhancing[0]} -> {core[0]} when small", names[enhancing[0]], names[core[0]]


def _decide_relabel(
    description: str,
    source: int,
    target: int,
    volumes: Sequence[float],
    current: list[np.ndarray],
    cases: Sequence[CaseResult],
    plan: Plan,
    score: Score,
) -> Decision:
    tried = {}
    for volume in sorted(volumes):
        step = RelabelSmall(source, target, float(volume))
        tried[float(volume)] = (step, _score([step.apply(p, c.spacing) for p, c in zip(current, cases)], cases, plan))
    step, after = max(tried.values(), key=lambda pair: pair[1].mean)  # first maximum: the smallest threshold
    return Decision(
        f"{description} (below {step.max_volume_mm3:g} mm³)",
        step,
        after.mean > score.mean,
        score,
        after,
        thresholds={v: s.mean for v, (_, s) in tried.items()},
    )
