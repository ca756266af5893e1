"""Dice of predicted label maps, summarised the way model selection compares them.

Per case, Dice of every label and region (both empty: 1, as in ``autoseg evaluate`` and
validation); per class, the mean over cases. The number that decides is the **mean
foreground Dice** over ``Plan.scored_classes`` (the regions of a region task, else the
foreground labels), the same number ``autoseg tune`` optimises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.core.plan import Plan, foreground_labels
from autoseg.data.evaluation.evaluate import dice_per_class


def foreground_values(plan: Plan) -> tuple[int, ...]:
    return tuple(sorted(foreground_labels(plan.labels).values()))


def case_dice(predicted: np.ndarray, truth: np.ndarray, plan: Plan) -> dict[str, float]:
    """Dice of every foreground label and region of one case (consecutive values)."""
    return dice_per_class(predicted, truth, plan.labels, [(r.name, r.labels) for r in plan.regions])


@dataclass(frozen=True)
class Score:
    """Mean Dice over cases per class, and the mean over the scored classes."""

    dice: dict[str, float]
    mean: float

    def to_json(self) -> dict:
        return {"mean_dice": self.mean, "dice": self.dice}


def summarize(per_case: Sequence[dict[str, float]], plan: Plan) -> Score:
    names = list(per_case[0])
    dice = {n: float(np.mean([case[n] for case in per_case])) for n in names}
    return Score(dice, float(np.mean([dice[n] for n in plan.scored_classes])))
