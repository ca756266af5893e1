"""``autoseg tune``: an Optuna study over a configuration's training choices.

:func:`tune_dataset` runs (or joins, or resumes) a study and writes the best trial into
plans.json as ``<configuration>_tuned``, a variant that inherits from its base and
overrides only what was tuned. :func:`study_report` summarises a study.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import load_plan, save_plan, to_json

if TYPE_CHECKING:
    import optuna

    from autoseg.core.plan import Plan
    from autoseg.core.workspace import DatasetWorkspace

log = logging.getLogger(__name__)
DEFAULT_TRIAL_EPOCHS = 50


@dataclass
class TuneResult:
    study_name: str
    storage: str
    finished: int
    pruned: int
    best_value: float | None
    best_params: dict = field(default_factory=dict)
    tuned_configuration: str | None = None
    #: False when plans.json already held this tuned configuration (another worker wrote it)
    written: bool = False


def tune_dataset(
    *,
    workdir: Path,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    folds: Sequence[str] = ("0",),
    n_trials: int = 20,
    timeout: float | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    val_iterations: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    space_file: Path | None = None,
    dimensions: Sequence[str] | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
    tuned_name: str | None = None,
    heartbeat: int | None = None,
    show_progress: bool = True,
) -> TuneResult:
    """Run trials until the study (all workers together) has ``n_trials`` finished ones or ``timeout`` passes.

    ``pruner`` is ``median``, ``hyperband``, ``none`` or (Python API) any Optuna pruner.
    ``storage`` is a database URL or ``journal:PATH``; ``heartbeat`` the seconds between a
    running trial's heartbeats (a trial silent for 3 of them is failed and retried).
    """
    import optuna

    from autoseg.core.workspace import find_dataset
    from autoseg.tuning import study as studies
    from autoseg.tuning.objective import TrialBudget, make_objective
    from autoseg.tuning.space import enabled, load_space

    workspace = find_dataset(workdir, dataset)
    plan = load_plan(workspace.plans)
    tuned_name = tuned_name or f"{configuration}_tuned"
    folds = _check_request(workspace, plan, configuration, tuned_name, folds)
    space = load_space(space_file, dimensions)
    if not enabled(space):
        raise WorkspaceError("the search space has no enabled dimension; enable one in --space or --dimensions")
    epochs = epochs or DEFAULT_TRIAL_EPOCHS
    trial_pruner = studies.make_pruner(pruner, epochs * len(folds)) if isinstance(pruner, str) else pruner
    name = study_name or configuration
    url = studies.storage_url(workspace, name, storage)
    heartbeat = heartbeat or studies.HEARTBEAT_INTERVAL_S
    storage_backend = studies.open_storage(url, heartbeat)
    identity = {"dataset": workspace.name, "configuration": configuration, "folds": folds, "epochs": epochs}
    identity |= {"iterations": iterations, "val_iterations": val_iterations, "space": space}
    study = studies.open_study(storage_backend, name, identity, trial_pruner, seed)
    studies.fail_dead_local_trials(study, storage_backend)
    budget = TrialBudget(epochs, iterations, val_iterations, device, workers, seed)
    objective = make_objective(
        workspace, plan, configuration, folds, space, budget, workspace.tuning / name, n_trials, show_progress
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's traceback; the objective logs one line
    _run_trials(study, objective, n_trials, timeout, heartbeat)
    return _finish(study, workspace, configuration, tuned_name, url)


def _check_request(
    workspace: DatasetWorkspace, plan: Plan, configuration: str, tuned_name: str, folds: Sequence[str]
) -> list[str]:
    """The configuration must be planned, the tuned name free, and every fold real: a bad fold must fail here,
    not inside a trial already stored in the study. Returns the folds as names."""
    from autoseg.training.trainer import fold_cases

    plan.configuration(configuration)
    existing = plan.configurations.get(tuned_name)
    planned = existing is not None and (  # a planned cascade stage is a variant that adds a previous stage
        existing.inherits_from is None
        or existing.previous_stage != plan.configurations[existing.inherits_from].previous_stage
    )
    if planned:
        raise WorkspaceError(f"{tuned_name!r} is a planned configuration; choose another name for the tuned one")
    folds = [str(f) for f in folds]
    if not folds:
        raise WorkspaceError("give at least one fold to tune on")
    for fold in folds:
        fold_cases(workspace, fold)
    return folds


def _run_trials(study: optuna.Study, objective, n_trials: int, timeout: float | None, poll_s: float) -> None:
    """Start trials while the study has room; while its last trials run elsewhere, wait and watch them.

    A worker does not stop before the study is complete (or ``timeout`` passes): if a trial
    running elsewhere dies, its retry must find a worker to run it.
    """
    from autoseg.tuning.study import StopAt, SurplusTrial, counted, finished, queued, wait_for_other_workers

    deadline = None if timeout is None else time.monotonic() + timeout
    if finished(study) >= n_trials:
        log.info("study %s already has %d of %d trials; nothing to run", study.study_name, finished(study), n_trials)
    while finished(study) < n_trials:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if counted(study) < n_trials or queued(study):
            study.optimize(
                objective, timeout=left, callbacks=[StopAt(n_trials)], gc_after_trial=True, catch=(SurplusTrial,)
            )
        else:
            wait_for_other_workers(study, poll_s if left is None else min(poll_s, left))


def _finish(study, workspace, configuration: str, tuned_name: str, url: str) -> TuneResult:
    """Write the best trial so far as the tuned configuration, unless plans.json already holds exactly it."""
    from optuna.trial import TrialState

    from autoseg.tuning.space import build_variant
    from autoseg.tuning.study import best_trial, file_lock

    trials = study.get_trials(deepcopy=False)
    result = TuneResult(
        study.study_name,
        url,
        sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
        sum(t.state == TrialState.PRUNED for t in trials),
        None,
    )
    best = best_trial(study)
    if best is None:
        log.warning("no trial of study %s completed yet; plans.json is unchanged", study.study_name)
        return result
    workspace.tuning.mkdir(parents=True, exist_ok=True)
    with file_lock(workspace.tuning / "plans.json.lock"):  # workers sharing the work folder write one at a time
        current = load_plan(workspace.plans)  # re-read: another worker may have written it meanwhile
        tuned = build_variant(current, current.configuration(configuration), tuned_name, best.params)
        updated = dataclasses.replace(current, configurations={**current.configurations, tuned_name: tuned})
        result.written = to_json(updated)["configurations"] != to_json(current)["configurations"]
        if result.written:
            save_plan(workspace.plans, updated)
    log.info(
        "best trial %d (Dice %.3f) %s %s as %s",
        best.number,
        best.value,
        "written to" if result.written else "already in",
        workspace.plans,
        tuned_name,
    )
    result.best_value, result.best_params, result.tuned_configuration = best.value, dict(best.params), tuned_name
    return result


def study_report(
    *,
    workdir: Path,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    study_name: str | None = None,
    storage: str | None = None,
) -> tuple[object, dict[str, float], Path]:
    """(the trials table, parameter importances, the optimisation-history PNG written)."""
    import optuna

    from autoseg.core.workspace import find_dataset
    from autoseg.tuning.study import importances, open_storage, storage_url, trials_table, write_history_png

    workspace = find_dataset(workdir, dataset)
    name = study_name or configuration
    if storage is None and not (workspace.tuning / f"{name}.db").is_file():
        raise WorkspaceError(f"no study {name!r} in {workspace.tuning}; run `autoseg tune` first")
    backend = open_storage(storage_url(workspace, name, storage))
    try:
        study = optuna.load_study(study_name=name, storage=backend)
    except KeyError as exc:
        raise WorkspaceError(f"the storage has no study {name!r}; run `autoseg tune` first") from exc
    png = workspace.tuning / f"{name}_history.png"
    write_history_png(study, png)
    return trials_table(study), importances(study), png


def result_lines(result: TuneResult) -> list[str]:
    """What ``tune`` prints when the study has run: the trial counts and the tuned configuration."""
    lines = [f"study {result.study_name}: {result.finished} finished trials ({result.pruned} pruned)"]
    if result.tuned_configuration:
        where = "written to" if result.written else "already in"
        lines.append(
            f"best Dice {result.best_value:.3f} -> {result.tuned_configuration} {where} plans.json; train "
            f"it with `autoseg train -c {result.tuned_configuration} --fold 0`"
        )
    return lines


def report(
    *, workdir: Path, dataset: str | None, configuration: str, study_name: str | None, storage: str | None
) -> list:
    """``tune --report``: the trials table, the parameter importances and the history PNG's path."""
    table, importances, png = study_report(
        workdir=workdir, dataset=dataset, configuration=configuration, study_name=study_name, storage=storage
    )
    if importances:
        line = "parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items())
    else:
        line = "parameter importances: need at least two complete trials that differ"
    return [table, line, f"optimisation history: {png}"]
