"""Shared fixtures: tiny synthetic datasets written as real files, and a CLI runner."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.phantoms import synthetic

#: Shape of the phantom brain cases the `trained` model learnt from.
PHANTOM_SHAPE = (32, 40, 36)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A work folder with a tiny phantom-brain model (8 cases, folds 0 and 1), shared by the test modules."""
    from autoseg.commands.plan import plan_dataset
    from autoseg.training.trainer import train_fold

    root = tmp_path_factory.mktemp("predict")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", 8, shape=PHANTOM_SHAPE)
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    for fold in ("0", "1"):
        train_fold(
            workdir=work,
            fold=fold,
            epochs=6,
            iterations=20,
            val_iterations=2,
            workers=0,
            device="cpu",
            show_progress=False,
        )
    return work


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> Path:
    """Three phantom cases the `trained` model never saw (MSD layout, with labels)."""
    return synthetic.write_msd_brain(tmp_path_factory.mktemp("heldout") / "Task01", 3, shape=PHANTOM_SHAPE, seed=123)


@pytest.fixture
def run_cli():
    """Invoke ``autoseg`` in-process; returns typer's Result (exit_code, output)."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return run


@pytest.fixture
def msd_brain(tmp_path: Path) -> Path:
    return synthetic.write_msd_brain(tmp_path / "Task01_BrainTumour", 5, shape=(24, 28, 26))


@pytest.fixture
def nnunet_ct(tmp_path: Path) -> Path:
    return synthetic.write_nnunet_ct(tmp_path / "Dataset003_Liver", 5)


@pytest.fixture
def brats(tmp_path: Path) -> Path:
    return synthetic.write_brats(tmp_path / "BraTS2021", 5, shape=(24, 28, 26))


@pytest.fixture
def dicom_brain(tmp_path: Path) -> Path:
    return synthetic.write_dicom_brain(tmp_path / "DicomBrain", 4, shape=(12, 20, 18))


class ProcessWatch:
    """The processes a command under test started, found through /proc (Linux).

    A process is known by (pid, start time), so a reused PID is never taken for it. Whatever
    :meth:`record` saw and still runs at teardown is killed, so a failing test leaves no orphan.
    """

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    @staticmethod
    def _stat(pid: int) -> tuple[str, int, int] | None:
        """(state, parent pid, start time) of a process, None once it is gone."""
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[1]), int(fields[19])

    def record(self, pid: int) -> set[int]:
        """Remember every running descendant of ``pid``; returns their PIDs."""
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := self._stat(int(entry.name))) is not None and stat[0] != "Z":
                parents[int(entry.name)] = stat
        found, frontier = set(), {pid}
        while frontier:
            frontier = {p for p, (_, ppid, _) in parents.items() if ppid in frontier} - found
            found |= frontier
        self.seen |= {(p, parents[p][2]) for p in found}
        return found

    def alive(self) -> set[int]:
        """The recorded processes still running (a zombie has ended)."""
        return {
            pid
            for pid, start in self.seen
            if (stat := self._stat(pid)) is not None and stat[0] != "Z" and stat[2] == start
        }

    def wait_all_ended(self, timeout: float = 10.0) -> set[int]:
        """Wait for every recorded process to end; returns those still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.alive()

    @staticmethod
    def wait_until(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
        """Poll ``condition`` until it holds; fail if ``process`` ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert process.poll() is None, f"the command ended before {what}"
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            time.sleep(0.02)

    def kill_survivors(self) -> None:
        for pid in self.alive():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def process_watch():
    watch = ProcessWatch()
    yield watch
    watch.kill_survivors()
