"""The Optuna study: storage, workers sharing it, resuming, and the report.

Storage is SQLite in ``tuning/<study>.db`` unless a database URL (``postgresql://``, any
SQLAlchemy URL) or a journal file (``journal:PATH``, for shared file systems without a
database server) is given; any number of workers (processes, machines) may share one study.
``--n-trials`` counts finished (complete or pruned) trials over all workers. Every running
trial beats a heartbeat; a worker killed mid-trial leaves its trial RUNNING, and once it has
been silent for ``GRACE_FACTOR`` heartbeats any other worker marks it FAIL and queues its
parameters once more (a restarted worker on the same host does so at once, its process
being gone). Workers wait for trials still running elsewhere before they stop, so the study
ends with exactly ``--n-trials`` finished trials, and a finished trial is never repeated.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # the interface optimize() beats and checks (no public name)
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from autoseg.core.errors import WorkspaceError
from autoseg.core.files import atomic_write_bytes
from autoseg.core.processes import hold_lock
from autoseg.core.tables import table
from autoseg.core.workspace import DatasetWorkspace

log = logging.getLogger(__name__)
HEARTBEAT_INTERVAL_S = 60
#: a running trial silent for this many heartbeat intervals is taken for dead
GRACE_FACTOR = 3
JOURNAL_PREFIX = "journal:"
HEARTBEAT_ATTR = "autoseg:heartbeat"
#: set by the objective on every way out of a trial; a FAIL trial without it died with its worker
ENDED_ATTR = "ended"
#: a dead trial's parameters are tried once more, not again if the retry dies too
MAX_RETRY = 1
#: how long after failing a dead trial its retry is expected to be queued
RETRY_WINDOW_S = 60
# optuna >= 4.9 names the retry hook for heartbeat-stale trials separately
_NEW_RETRY = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
SQLITE_TIMEOUT_S = 120
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNERS = ("median", "hyperband", "none")


def storage_url(workspace: DatasetWorkspace, study_name: str, url: str | None) -> str:
    if url:
        return url
    workspace.tuning.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workspace.tuning / f'{study_name}.db'}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive OS lock on ``path``, held for the block; a killed holder leaves none behind."""
    with hold_lock(path):
        yield


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Serialise the first opening of a local SQLite file: two workers creating its tables at the
    same moment would otherwise collide ("table ... already exists")."""
    if not url.startswith("sqlite:///"):
        yield
        return
    with file_lock(Path(url.removeprefix("sqlite:///") + ".lock")):
        yield


def database_url(url: str) -> str:
    """``postgresql://`` names SQLAlchemy's psycopg2 dialect; autoseg's extra installs psycopg 3.

    A URL that names its driver (``postgresql+psycopg2://``) is kept as it is.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_INTERVAL_S, attempts: int = 3) -> BaseStorage:
    """The study's storage, with heartbeats: ``journal:PATH`` or a database URL.

    SQLite waits for its lock instead of failing under several workers. Opening is retried a
    few times: workers on several machines may create a new database's tables at the same
    moment (a local SQLite file is also guarded by a file lock).
    """
    if url.startswith(JOURNAL_PREFIX):
        return _open_journal(Path(url.removeprefix(JOURNAL_PREFIX)), heartbeat_s)
    url = database_url(url)
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    retry = (
        {"heartbeat_stale_trial_callback": retry_callback()}
        if _NEW_RETRY
        else {"failed_trial_callback": retry_callback()}
    )
    attempt = 0
    while True:
        attempt += 1
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                return RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_s,
                    grace_period=GRACE_FACTOR * heartbeat_s,
                    **retry,
                )
        except (ImportError, ModuleNotFoundError) as exc:
            raise WorkspaceError(
                f"storage {url}: {exc}; install the database driver (pip install 'autoseg[postgres]' for postgresql://)"
            ) from exc
        except Exception as exc:  # SQLAlchemy's errors: bad URL, unreachable server, wrong password
            if attempt == attempts:
                raise WorkspaceError(f"cannot open the tuning storage {url}: {exc}") from exc
            log.warning("opening %s failed (%s); retrying", url, str(exc).splitlines()[0])
            time.sleep(attempt)


def _open_journal(path: Path, heartbeat_s: int) -> HeartbeatJournalStorage:
    if not path.parent.is_dir():
        raise WorkspaceError(
            f"the journal's folder {path.parent} does not exist; create it or give another {JOURNAL_PREFIX}PATH"
        )
    try:
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_s, retry_callback())
    except (OSError, ValueError) as exc:
        raise WorkspaceError(f"cannot open the journal {path}: {exc}") from exc


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with the heartbeat that only its RDB storage has (optuna 5).

    A running trial's heartbeat is a system attribute holding the writer's clock
    (``time.time()``), so the machines sharing a journal need synchronised clocks (NTP).
    Optuna's optimise loop beats it and fails stale trials, exactly as for a database.
    """

    def __init__(self, backend: JournalFileBackend, heartbeat_s: int, callback: Any) -> None:
        super().__init__(backend)
        self._heartbeat_s, self._callback = heartbeat_s, callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker took this trial for dead and failed it; the trial itself learns on its next write

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """RUNNING trials whose last heartbeat (or start, before the first one) is older than the grace period."""
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            # a retried trial inherits its predecessor's beat: only beats after its own start count
            last = max(started, trial.system_attrs.get(HEARTBEAT_ATTR, started))
            if now - last > GRACE_FACTOR * self._heartbeat_s:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self._callback

    def get_failed_trial_callback(self) -> Any:  # the name optuna < 4.9 calls
        return self._callback


def retry_callback() -> Any:
    """Enqueue a failed (killed) trial's parameters once more."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if _NEW_RETRY:
            return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        return RetryFailedTrialCallback(max_retry=MAX_RETRY)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """Median: stop a trial below the median of earlier ones at the same epoch; Hyperband: successive halving."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 5))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, epochs // 10), max_resource=epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise WorkspaceError(f"unknown pruner {name!r}; choose from {list(PRUNERS)}")


def open_study(
    storage: BaseStorage, study_name: str, identity: dict[str, Any], pruner: optuna.pruners.BasePruner, seed: int
) -> optuna.Study:
    """Create or join the study; a study created for another configuration, fold or space is refused."""
    probe = optuna.load_study(study_name=study_name, storage=storage) if _exists(storage, study_name) else None
    start = len(probe.trials) if probe is not None else 0
    # Seeded per worker start: a fresh single run is reproducible, and a resumed or second worker
    # starts from new draws instead of repeating the first worker's.
    sampler = optuna.samplers.TPESampler(seed=seed + start)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
    elif saved != identity:
        changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise WorkspaceError(
            f"study {study_name!r} was started with other settings ({', '.join(changed)}: "
            f"{ {k: saved.get(k) for k in changed} }); use them again or choose another --study"
        )
    return study


def _exists(storage: BaseStorage, study_name: str) -> bool:
    return any(s.study_name == study_name for s in storage.get_all_studies())


def fail_dead_local_trials(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """RUNNING trials of this host whose process is gone (killed worker) become FAIL now."""
    host, failed = socket.gethostname(), []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") != host or pid is None or pid == os.getpid() or _alive(pid):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first (and queued its retry)
        failed.append(trial.number)
        retry_callback()(study, storage.get_trial(trial_id))
    if failed:
        log.info("trial(s) %s of a stopped worker marked failed; their parameters are tried again", failed)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(study: optuna.Study) -> int:
    """Complete and pruned trials, over all workers: what --n-trials counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def wait_for_other_workers(study: optuna.Study, poll_s: float) -> None:
    """Wait ``poll_s``, then fail the trials whose worker stopped beating (their parameters are queued again).

    A worker calls this while the study's last trials run elsewhere: should one of them
    die, its retry has to be run by someone.
    """
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    log.info("waiting for trial(s) %s running on other workers", running)
    time.sleep(poll_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def counted(study: optuna.Study) -> int:
    """How many trials count towards --n-trials now (see :func:`counted_numbers`)."""
    return len(counted_numbers(study.get_trials(deepcopy=False)))


def counted_numbers(trials: list[FrozenTrial]) -> list[int]:
    """Trials that count towards --n-trials: finished, running, queued and about to be queued.

    Failing a dead trial and queueing its retry are two steps of Optuna's (FAIL, then a new
    WAITING trial); a worker looking in between must already count the retry, or it starts a
    fresh trial and the retry is left over (see :func:`awaiting_retry`).
    """
    live = [t.number for t in trials if t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)]
    return live + awaiting_retry(trials)


def queued(study: optuna.Study) -> bool:
    """Whether a retry waits for a worker (Optuna's ``optimize`` runs WAITING trials first)."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def awaiting_retry(trials: list[FrozenTrial]) -> list[int]:
    """Failed trials whose worker died (no :data:`ENDED_ATTR`), failed moments ago, with a retry
    due but not queued yet. After :data:`RETRY_WINDOW_S` a missing retry is not coming (the worker
    failing the trial died between the two steps, or the study predates :data:`ENDED_ATTR`)."""
    retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
    recent = datetime.datetime.now() - datetime.timedelta(seconds=RETRY_WINDOW_S)
    return [
        t.number
        for t in trials
        if t.state == TrialState.FAIL
        and not t.user_attrs.get(ENDED_ATTR)
        and t.number not in retried
        and len(t.system_attrs.get("retry_history", [])) < MAX_RETRY
        and t.datetime_complete is not None
        and t.datetime_complete > recent
    ]


class SurplusTrial(Exception):
    """Raised by a trial that found the study's trial count already reached when it started."""


def is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """True when ``n_trials`` counted trials were created before trial ``number``.

    Two workers that check :func:`counted` at the same instant may both start a trial; the
    later-numbered one then finds itself surplus and ends before training (state FAIL,
    ``user_attrs["surplus"]``), so the study never passes ``n_trials``.
    """
    return sum(n < number for n in counted_numbers(study.get_trials(deepcopy=False))) >= n_trials


class StopAt:
    """Stop this worker once the counted trials (all workers) reach ``n_trials`` and no retry is queued."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if counted(study) >= self.n_trials and not queued(study):
            study.stop()


# --------------------------------------------------------------------------- report


def trials_table(study: optuna.Study) -> Any:
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    best = best_trial(study)
    rows = []
    for t in trials:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        steps = (max(t.intermediate_values) + 1) if t.intermediate_values else 0
        state = "SKIPPED" if t.user_attrs.get("surplus") else t.state.name
        rows.append(
            [
                f"{t.number}{' *' if best is not None and t.number == best.number else ''}",
                state,
                "" if t.value is None else f"{t.value:.3f}",
                str(steps),
                "" if seconds is None else f"{seconds:.0f}",
                *(_fmt(t.params.get(n)) for n in names),
            ]
        )
    return table(
        f"study {study.study_name}: {len(trials)} trials",
        ["trial", "state", "Dice", "epochs", "time (s)", *names],
        rows,
    )


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances over complete trials (empty when fewer than two, or no parameter varied)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            )
    except (RuntimeError, ValueError) as exc:
        log.debug("no importances: %s", exc)
        return {}


def write_history_png(study: optuna.Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        axes = plot_optimization_history(study, target_name="full-volume Dice")
    buffer = io.BytesIO()
    axes.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(axes.figure)
    atomic_write_bytes(path, buffer.getvalue())


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if not isinstance(value, str) else value
