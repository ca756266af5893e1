"""One Optuna trial: a short training run of a plan variant, scored on full-volume Dice.

The trial trains in ``tuning/<study>/trial_<n>/fold_<k>`` (never under ``models/``),
reports the per-epoch pseudo-Dice so the pruner can stop it early, and returns the mean
full-volume validation Dice over its folds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from autoseg.core.plan import Configuration, Plan
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.io.dataset_record import load_dataset_record
from autoseg.data.preprocessing.pipeline import preprocess_dataset
from autoseg.training.real_validation import mean_real_dice
from autoseg.training.settings import TrainRequest
from autoseg.tuning.space import build_variant, suggest
from autoseg.tuning.study import ENDED_ATTR, SurplusTrial, is_surplus
from autoseg.workflows.fold import train_and_validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialBudget:
    """What one trial may spend, per fold (the options ``autoseg train`` takes)."""

    epochs: int
    iterations: int | None
    val_iterations: int | None
    device: str = "auto"
    workers: int | None = None
    seed: int = 0


def with_configuration(plan: Plan, config: Configuration) -> Plan:
    return dataclasses.replace(plan, configurations={**plan.configurations, config.name: config})


def ensure_preprocessed(workspace: DatasetWorkspace, plan: Plan, config: Configuration, show_progress: bool) -> None:
    """Preprocess for a configuration whose preprocessing differs from its base (done cases are skipped)."""
    if config.data_identifier in {c.data_identifier for c in plan.configurations.values() if c is not config}:
        return
    spec = load_dataset_record(workspace.dataset_json)
    preprocess_dataset(spec, plan, config, workspace.preprocessed(config.data_identifier), 1, show_progress)


def worker_identity() -> dict[str, Any]:
    """Recorded on every trial so a restarted worker can tell its own dead trials apart."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def make_objective(
    workspace: DatasetWorkspace,
    plan: Plan,
    base: str,
    folds: Sequence[str],
    space: dict,
    budget: TrialBudget,
    trials_dir: Path,
    n_trials: int,
    show_progress: bool,
) -> Callable[[optuna.Trial], float]:
    base_config = plan.configuration(base)

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial)
        except (SurplusTrial, optuna.TrialPruned):
            raise
        except Exception as exc:  # one line here; Optuna's own report of it (a traceback) is silenced
            log.error("trial %d failed: %s", trial.number, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        finally:  # any way out but a dead worker: the trial needs no retry
            trial.set_user_attr(ENDED_ATTR, True)

    def run_trial(trial: optuna.Trial) -> float:
        for key, value in worker_identity().items():
            trial.set_user_attr(key, value)
        if is_surplus(trial.study, trial.number, n_trials):
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise SurplusTrial(f"another worker started the study's last trial ({n_trials}) at the same time")
        params = suggest(trial, space, plan.channel_names)
        config = build_variant(plan, base_config, f"{base}_trial{trial.number}", params)
        variant_plan = with_configuration(plan, config)
        ensure_preprocessed(workspace, variant_plan, config, show_progress)
        log.info("trial %d: %s", trial.number, params)
        scores = _score_folds(workspace, variant_plan, config.name, folds, budget, trial, trials_dir, show_progress)
        return float(np.mean(scores))

    return objective


def _score_folds(
    workspace: DatasetWorkspace,
    variant_plan: Plan,
    configuration: str,
    folds: Sequence[str],
    budget: TrialBudget,
    trial: optuna.Trial,
    trials_dir: Path,
    show_progress: bool,
) -> list[float]:
    """Train and validate the trial's variant on each fold; its mean Dice per fold (also a user attribute)."""
    scores = []
    request = TrainRequest(
        budget.epochs,
        budget.iterations,
        budget.val_iterations,
        budget.workers,
        seed=budget.seed + trial.number,
        resume=False,
    )
    for index, fold in enumerate(folds):
        result = train_and_validate(
            workdir=workspace.root.parent,
            dataset=workspace.name,
            configuration=configuration,
            fold=fold,
            request=request,
            device=budget.device,
            tta=False,
            show_progress=show_progress,
            plan=variant_plan,
            output_folder=trials_dir / f"trial_{trial.number}" / f"fold_{fold}",
            on_epoch_end=_pruning_reporter(trial, index * budget.epochs),
        )
        scores.append(mean_dice(result.validation, variant_plan))
        trial.set_user_attr(f"dice_fold_{fold}", scores[-1])
    return scores


def _pruning_reporter(trial: optuna.Trial, offset: int) -> Callable[[int, dict], None]:
    """Report the epoch's pseudo-Dice at step ``offset + epoch``; let the pruner stop the trial."""

    def report(epoch: int, entry: dict) -> None:
        trial.report(float(entry["pseudo_dice_mean"]), offset + epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pseudo-Dice {entry['pseudo_dice_mean']:.3f} at epoch {epoch}")

    return report


def mean_dice(summary: dict | None, plan: Plan) -> float:
    """Mean full-volume Dice over the plan's scored classes (regions of a region task, else the
    foreground labels), the number ``autoseg select`` ranks on; classes absent everywhere do not count."""
    return mean_real_dice((summary or {}).get("mean", {}), plan.scored_classes)
