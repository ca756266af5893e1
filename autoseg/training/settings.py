"""The resolved settings of a training run: one precedence (CLI > plan > default), stated once.

They are saved inside every checkpoint and at the top of ``log.jsonl``, so a run's
identity is its resolved configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from autoseg.core.plan import Training

DEFAULT_EPOCHS = 1000
DEFAULT_ITERATIONS = 250
DEFAULT_VAL_ITERATIONS = 50


@dataclass(frozen=True)
class TrainingSettings:
    dataset: str
    configuration: str
    fold: str
    epochs: int = DEFAULT_EPOCHS
    iterations: int = DEFAULT_ITERATIONS
    val_iterations: int = DEFAULT_VAL_ITERATIONS
    initial_lr: float = Training.initial_lr
    lr_exponent: float = 0.9
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    foreground_fraction: float = Training.foreground_fraction
    batch_size: int = 0
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    checkpoint_every: int = 1
    world_size: int = 1
    #: fine-tuning: the learning rate rises linearly over these first epochs
    warmup_epochs: int = 0
    #: fine-tuning: the encoder is frozen for these first epochs
    freeze_encoder_epochs: int = 0
    #: fine-tuning: only the segmentation heads train for these first epochs (everything else frozen)
    heads_first_epochs: int = 0
    #: fine-tuning: the model the weights came from ("" for a run from scratch)
    pretrained: str = ""
    #: real validation (full-volume Dice of the validation cases) every this many epochs; 0: none
    val_every: int = 0
    #: early stopping: end after this many validations without a better real Dice; 0: never
    early_stop: int = 0
    #: early stopping: a real Dice counts as better only when it beats the best by more than this
    early_stop_delta: float = 0.0
    #: early stopping: epochs over which the learning rate then decays to 0; None: half the epochs trained
    early_stop_cooldown: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainRequest:
    """What a caller (``autoseg train``, a tuning trial, ``--continue``) asks of a run, before the one
    precedence resolves it into :class:`TrainingSettings`: None means "the resumed run's, else the plan's,
    else the default". Built once and passed down whole, instead of a keyword argument per knob."""

    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    workers: int | None = None
    seed: int = 0
    #: continue from checkpoint_latest.pt when it exists
    resume: bool = True
    compile_model: bool = False
    checkpoint_every: int = 1
    warmup_epochs: int | None = None
    freeze_encoder_epochs: int | None = None
    heads_first_epochs: int | None = None
    #: real validation every this many epochs (None: the default interval, 0: never)
    val_every: int | None = None
    early_stop: int | None = None
    early_stop_delta: float | None = None
    early_stop_cooldown: int | None = None

    @classmethod
    def of(cls, request: TrainRequest | None = None, **changes: object) -> TrainRequest:
        """``request`` (default: every field at its default) with ``changes``, the keyword shorthand of the
        Python API (``train_fold(..., epochs=5)``); an unknown name is a TypeError, as for a function."""
        return dataclasses.replace(request if request is not None else cls(), **changes)


def poly_lr(
    settings: TrainingSettings, epoch: int, stopped_epoch: int | None = None, cooldown_end: int | None = None
) -> float:
    """Polynomial decay over the whole budget, after a linear warm-up over ``warmup_epochs``. The warm-up
    protects pretrained features, so it starts when they start to train: after the heads-first epochs
    (whose lr is the schedule's own). After an early stop at ``stopped_epoch``, the same curve is laid
    over the epochs up to ``cooldown_end`` instead: from the stop epoch's rate down to 0, the last epoch
    at the share of it the budget's last epoch gets with a budget of that length. Depends only on these
    numbers (saved in the checkpoint), so resume is exact."""
    if stopped_epoch is not None and cooldown_end is not None and epoch > stopped_epoch:
        left = max(0.0, 1 - (epoch - stopped_epoch) / (cooldown_end - stopped_epoch + 1))
        return poly_lr(settings, stopped_epoch) * left**settings.lr_exponent
    ramp = epoch - settings.heads_first_epochs
    warmup = 1.0 if ramp < 0 else min(1.0, (ramp + 1) / (settings.warmup_epochs + 1))
    return warmup * settings.initial_lr * (1 - epoch / settings.epochs) ** settings.lr_exponent
