"""Real validation during training: how often it runs, what it scores, and when it stops training.

The prediction itself needs the predictor, a sibling layer, so the trainer receives it as a
callable (:class:`Validation`) from :mod:`autoseg.workflows.fold`. This module holds only the
numbers: the default interval and the early-stopping rule, kept in a small state that travels
inside every checkpoint so a resumed run stops exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

#: The default interval keeps validation at about this share of the training time.
TARGET_COST = 0.10
#: A training step (forward, backward, update) costs about this many forward passes of the same patch.
TRAIN_STEP_PASSES = 3
#: With early stopping, a validation is better only when it beats the best by more than this (Dice, 0-1):
#: on a plateau the real Dice of a few validation cases moves by about this much from one validation to
#: the next (docs/training.md), and a new best by less must not restart the patience count.
DEFAULT_EARLY_STOP_DELTA = 0.005
#: After an early stop, the learning rate cools down to 0 over this share of the epochs trained so far
#: (a third of the shortened run, as the planned poly schedule spends its last third below about 0.37
#: of the initial rate); docs/training.md says why.
COOLDOWN_SHARE = 0.5


class Validation(Protocol):
    """The fold's validation cases predicted in full (as ``autoseg predict`` would) and scored."""

    #: forward passes of one network patch that one validation costs (tiles over all its cases)
    forward_passes: int

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Class name -> mean Dice over the validation cases, for these weights."""
        ...


def default_val_every(forward_passes: int, batch_size: int, iterations: int, val_iterations: int) -> int:
    """Epochs between validations so that validating costs about :data:`TARGET_COST` of training.

    One epoch costs ``batch_size × (3 × iterations + val_iterations)`` patch forward passes
    (a training step counted as three); one validation costs one pass per sliding-window tile.
    """
    epoch = batch_size * (TRAIN_STEP_PASSES * iterations + val_iterations)
    return max(1, math.ceil(forward_passes / (TARGET_COST * epoch)))


def mean_real_dice(dice: dict[str, float], scored: list[str]) -> float:
    """The number validation ranks on: mean Dice over the plan's scored classes (absent ones skipped)."""
    values = [dice[n] for n in scored if dice.get(n) is not None and np.isfinite(dice[n])]
    return float(np.mean(values)) if values else 0.0


def cooldown_epochs(stopped_epoch: int, budget: int, requested: int | None) -> int:
    """Epochs of learning-rate cool-down after an early stop at ``stopped_epoch`` (0-based): ``requested``,
    else :data:`COOLDOWN_SHARE` of the epochs trained so far (rounded up); never past the budget."""
    wanted = requested if requested is not None else math.ceil(COOLDOWN_SHARE * (stopped_epoch + 1))
    return max(0, min(wanted, budget - stopped_epoch - 1))


@dataclass
class RealDiceState:
    """The best real Dice so far, when it was reached, and how many validations since did not beat it.

    "Beat" means by more than ``delta`` (early stopping's minimum improvement, 0 without early
    stopping): one rule for ``checkpoint_best.pt`` and for the patience count, so the best that
    the stop names is the checkpoint that holds it. ``stopped_epoch`` is set once early stopping
    triggered, ``cooldown_end`` with it: the last epoch the run trains, while its learning rate
    cools down (equal to ``stopped_epoch`` without a cool-down).
    """

    best: float = -1.0
    best_epoch: int = -1
    since_best: int = 0
    stopped_epoch: int | None = None
    cooldown_end: int | None = None

    def update(self, score: float, epoch: int, delta: float = 0.0) -> bool:
        """Record one validation; True when it beats every earlier one by more than ``delta``."""
        if score > self.best + delta:
            self.best, self.best_epoch, self.since_best = score, epoch, 0
            return True
        self.since_best += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """True once ``patience`` validations in a row have not improved (``patience`` 0: never)."""
        return patience > 0 and self.since_best >= patience

    def stop(self, epoch: int, cooldown: int) -> None:
        """Early stopping triggered at ``epoch``: the run ends after ``cooldown`` more epochs."""
        self.stopped_epoch, self.cooldown_end = epoch, epoch + cooldown

    def finished(self, epoch: int) -> bool:
        """True once ``epoch`` is the stopped run's last (the end of its cool-down)."""
        return self.cooldown_end is not None and epoch >= self.cooldown_end

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> RealDiceState:
        """The state a checkpoint holds; one from before the cool-down existed ended at its stop."""
        if not data:
            return cls()
        return cls(**{"cooldown_end": data.get("stopped_epoch"), **data})
