"""``autoseg train``: one fold of one configuration trained (or continued, or only validated), then its
validation Dice. The options are one :class:`TrainOptions`, checked once; the run's knobs travel down as
its :class:`~autoseg.training.settings.TrainRequest`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autoseg.core.errors import OptionError
from autoseg.core.workspace import default_workdir
from autoseg.training.settings import TrainRequest
from autoseg.training.trainer import TrainResult
from autoseg.workflows.fold import FoldResult


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``autoseg train`` was asked; ``request`` holds what the trainer resolves."""

    fold: str = "0"
    dataset: str | None = None
    configuration: str = "3d_fullres"
    workdir: Path | None = None
    device: str = "auto"
    request: TrainRequest = field(default_factory=TrainRequest)
    validate: bool = True
    validate_only: bool = False
    tta: bool = True
    pretrained: Path | None = None
    continue_: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        r = self.request
        if self.continue_ and (
            self.pretrained is not None
            or self.validate_only
            or r.val_every
            or r.early_stop
            or r.early_stop_delta is not None
            or r.early_stop_cooldown is not None
        ):
            raise OptionError(
                "--continue goes on from the fold's own final weights with a short schedule: it "
                "takes none of --pretrained, --validate-only, --val-every, --early-stop, "
                "--early-stop-delta, --early-stop-cooldown",
                "--continue",
            )
        if self.fold == "all" and (r.val_every or r.early_stop):
            option = "--early-stop" if r.early_stop else "--val-every"
            raise OptionError(
                "--fold all holds no case out: its validation cases are its training cases, so the real Dice, "
                "checkpoint_best.pt and early stopping would follow training Dice; train a numbered fold for them",
                option,
            )


def train(options: TrainOptions) -> FoldResult | dict:
    """Train (``--continue``: continue) the fold and validate it; with ``--validate-only`` only validate
    its final checkpoint (the validation summary is returned then)."""
    from autoseg.workflows.continuation import continue_fold
    from autoseg.workflows.fold import load_pretrained, train_and_validate, validate_fold

    o = options
    workdir = o.workdir if o.workdir is not None else default_workdir()
    common = {
        "workdir": workdir,
        "dataset": o.dataset,
        "configuration": o.configuration,
        "fold": o.fold,
        "device": o.device,
        "tta": o.tta,
        "show_progress": o.show_progress,
    }
    if o.validate_only:
        return validate_fold(**common)
    if o.continue_:
        return continue_fold(request=o.request, validate=o.validate, **common)
    pretrained = load_pretrained(o.pretrained, prefer=o.configuration) if o.pretrained is not None else None
    return train_and_validate(request=o.request, validate=o.validate, pretrained=pretrained, **common)


def result_lines(result: FoldResult | dict, fold: str) -> list[str]:
    """What ``train`` prints: the early stop, if any, then the fold's mean Dice per class (before and after
    for ``--continue``)."""
    if isinstance(result, dict):  # --validate-only
        return validation_lines(result, None, fold)
    lines = [early_stop_line(result.training)] if result.training.stopped_epoch is not None else []
    return lines + validation_lines(result.validation, result.before, fold)


def early_stop_line(trained: TrainResult) -> str:
    """What ``train`` says when early stopping ended the run, and its learning-rate cool-down."""
    cooled = (
        f"; trained on to epoch {trained.cooldown_end + 1} while the learning rate cooled down"
        if trained.cooldown_end > trained.stopped_epoch
        else ""
    )
    return (
        f"stopped early after epoch {trained.stopped_epoch + 1} of {trained.epochs}: the real Dice stopped "
        f"improving{cooled} (checkpoint_best.pt holds the best)"
    )


def validation_lines(summary: dict | None, before: dict | None, fold: str) -> list[str]:
    """The fold's mean Dice per class (before and after for --continue)."""
    # fold all validates on its own training cases: its Dice is no held-out estimate
    what = "Dice on the training cases (fold all holds none out)" if fold == "all" else "validation Dice"
    lines = []
    if before:
        lines.append(f"{what} before --continue: " + ", ".join(f"{k} {v:.3f}" for k, v in before["mean"].items()))
    if summary:
        lines.append(
            f"{what}{' after --continue' if before else ''}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in summary["mean"].items())
        )
    return lines
