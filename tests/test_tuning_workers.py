"""`autoseg tune` with several worker processes on one study, one of them SIGKILLed mid-trial.

The same scenario runs on the three storages a cluster uses: SQLite (one machine), a real
PostgreSQL server (a throw-away cluster started here from Debian's packages) and Optuna's
journal file (a shared file system without a database). The killed trial must be failed by
the heartbeat, retried once by a surviving worker, and the study must end with exactly
``--n-trials`` complete trials and the tuned configuration written once.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from autoseg.commands.plan import plan_dataset
from autoseg.phantoms import synthetic

ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 3
HEARTBEAT_S = 2
#: every parameter fixed but a continuous learning rate: a repeated parameter set can only be a retry
SPACE = {
    "version": 1,
    "dimensions": {
        "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
        "batch_size": {"choices": [1]},
        "width": {"choices": [0.5]},
        "depth": {"choices": [0]},
        "augmentation_strength": {"choices": [0.0]},
        "loss": {"choices": ["dice_ce"]},
        "foreground_fraction": {"choices": [0.5]},
    },
}


# --------------------------------------------------------------------------- a throw-away PostgreSQL server


def _unavailable(reason: str) -> None:
    """Skip with the reason; in CI (CI=true) fail instead, so CI proves the PostgreSQL path runs."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL test server unavailable in CI: {reason}")
    pytest.skip(f"PostgreSQL test server unavailable: {reason}")


def _postgres_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _run(command: list, what: str) -> None:
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, encoding="utf-8", errors="replace", timeout=120
    )
    if result.returncode != 0:
        _unavailable(f"{what} failed: {(result.stderr or result.stdout).strip()[-500:]}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary folder, listening only on a Unix socket there; stopped at the end.

    The server refuses to run as root, so as root it runs as Debian's ``postgres`` user.
    """
    try:
        import psycopg  # noqa: F401  (the driver autoseg[postgres] installs)
    except ImportError:
        _unavailable("the driver psycopg is not installed (pip install 'autoseg[postgres]')")
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("no initdb found; install Debian's postgresql package (.ci/run does)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="autoseg-pg-"))
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    started = False
    try:
        _run(
            [*as_user, bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
            "initdb",
        )
        _run(
            [
                *as_user,
                bindir / "pg_ctl",
                "-D",
                data,
                "-l",
                root / "server.log",
                "-w",
                "-t",
                "60",
                "-o",
                f"-k {root} -c listen_addresses='' -F",
                "start",
            ],
            "pg_ctl start",
        )
        started = True
        yield f"postgresql://postgres@/postgres?host={root}"
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- the scenario


@pytest.fixture(scope="module")
def planned_work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    dataset = synthetic.write_msd_brain(root / "raw", 5, shape=(24, 28, 26))
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    (root / "space.json").write_text(json.dumps(SPACE))
    return work


def _worker(work: Path, storage: list[str], seed: int) -> subprocess.Popen:
    args = [
        "tune",
        "-w",
        str(work),
        "--study",
        "killed",
        "--n-trials",
        str(N_TRIALS),
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--pruner",
        "none",
        "--heartbeat",
        str(HEARTBEAT_S),
        "--seed",
        str(seed),
        "--space",
        str(work.parent / "space.json"),
        *storage,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "autoseg.cli", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )


def _load(url: str) -> optuna.Study | None:
    from autoseg.tuning.study import open_storage

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None  # no worker has created the database yet
    try:
        return optuna.load_study(study_name="killed", storage=open_storage(url, HEARTBEAT_S))
    except KeyError:  # no worker has created the study yet
        return None


def _kill_a_worker_mid_trial(workers: list[subprocess.Popen], url: str, trials_dir: Path) -> optuna.trial.FrozenTrial:
    """SIGKILL the first worker seen training a trial; returns that trial as it was."""
    by_pid = {w.pid: w for w in workers}
    study, deadline = None, time.time() + 300
    while time.time() < deadline:
        ended = [w for w in workers if w.poll() is not None]
        assert not ended, f"a worker ended before one could be killed: {ended[0].communicate()[0][-3000:]}"
        study = study or _load(url)
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if study else ():
            victim = by_pid.get(trial.user_attrs.get("pid"))
            if victim is not None and (trials_dir / f"trial_{trial.number}" / "fold_0").is_dir():
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                return trial
        time.sleep(0.1)
    raise AssertionError("no worker started training a trial within 300 s")


def _storage_for(kind: str, work: Path, request) -> tuple[list[str], str]:
    """(the --storage option, the URL the test reads the study with)."""
    if kind == "sqlite":
        return [], f"sqlite:///{work / 'raw' / 'tuning' / 'killed.db'}"
    if kind == "journal":
        url = f"journal:{work / 'killed.journal'}"
        return ["--storage", url], url
    url = request.getfixturevalue("postgres_url")
    return ["--storage", url], url


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_a_worker_killed_mid_trial_is_replaced_and_the_study_ends_complete(kind, planned_work, tmp_path, request):
    work = tmp_path / "work"
    shutil.copytree(planned_work, work)
    shutil.copy(planned_work.parent / "space.json", tmp_path / "space.json")
    storage, url = _storage_for(kind, work, request)
    workers = [_worker(work, storage, seed) for seed in (0, 10, 20)]
    try:
        killed = _kill_a_worker_mid_trial(workers, url, work / "raw" / "tuning" / "killed")
        survivors = [w for w in workers if w.returncode is None]
        outputs = [w.communicate(timeout=400)[0] for w in survivors]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert len(survivors) == 2 and all(w.returncode == 0 for w in survivors), outputs

    trials = _load(url).trials
    by_number = {t.number: t for t in trials}
    assert by_number[killed.number].state == optuna.trial.TrialState.FAIL
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    # the killed trial's parameters ran once more, to the end, on a surviving worker
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].user_attrs["pid"] in {w.pid for w in survivors}
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == N_TRIALS  # no parameter set twice
    # every other failed trial is a surplus one that ended before training
    assert all(
        t.user_attrs.get("surplus")
        for t in trials
        if t.state == optuna.trial.TrialState.FAIL and t.number != killed.number
    )

    best = max(complete, key=lambda t: t.value)
    tuned = json.loads((work / "raw" / "plans.json").read_text())["configurations"]["3d_fullres_tuned"]
    assert tuned["training"]["initial_lr"] == best.params["learning_rate"]
    assert all(f"{N_TRIALS} finished trials" in out for out in outputs), outputs
    assert sum("written to plans.json" in out for out in outputs) == 1, outputs  # the other found it there
    assert sum("already in plans.json" in out for out in outputs) == 1, outputs


def test_postgresql_url_uses_the_psycopg3_driver_autoseg_installs():
    from autoseg.tuning.study import database_url

    assert database_url("postgresql://u:pw@db:5432/optuna") == "postgresql+psycopg://u:pw@db:5432/optuna"
    assert database_url("postgresql+psycopg2://u@db/optuna") == "postgresql+psycopg2://u@db/optuna"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_journal_in_a_missing_folder_is_refused_by_name(tmp_path):
    from autoseg.core.errors import WorkspaceError
    from autoseg.tuning.study import open_storage

    with pytest.raises(WorkspaceError, match="journal's folder .*nowhere does not exist"):
        open_storage(f"journal:{tmp_path / 'nowhere' / 'study.journal'}")


def test_journal_heartbeat_fails_a_silent_trial_and_queues_its_retry(tmp_path):
    """The journal storage has no heartbeat in optuna 5; autoseg's must fail a trial whose beats stopped."""
    from autoseg.tuning.study import GRACE_FACTOR, open_storage

    storage = open_storage(f"journal:{tmp_path / 'study.journal'}", heartbeat_s=1)
    study = optuna.create_study(storage=storage, direction="maximize")
    silent, alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), study.ask()
    storage.record_heartbeat(silent._trial_id)
    time.sleep(GRACE_FACTOR * 1 + 1.5)
    storage.record_heartbeat(alive._trial_id)  # beats on: stays RUNNING
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental API; "heartbeats are meant for optimize()"
        optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[silent.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == optuna.trial.TrialState.RUNNING
    retry = study.trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["failed_trial"] == silent.number
    assert retry.params == study.trials[silent.number].params
