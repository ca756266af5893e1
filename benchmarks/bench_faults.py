"""Fault-injection benchmark: kills, a full disk, a read-only folder and hostile inputs, counted.

What a user's machine does to a run, done on purpose at seeded random moments, with the
figures docs/reliability.md reports:

1. **SIGKILL** of the main process only (as the OOM killer or a closed laptop does, workers
   left to fend for themselves) at ``--kills-per-command`` moments drawn uniformly over the
   length of an uninterrupted run of each of ``plan -j 2``, ``train`` (with an augmentation
   worker), ``predict`` (several cases, TTA), ``tune`` (2 workers on one SQLite study; one of
   them is killed) and ``export`` / ``import``. After each kill: processes of the killed run
   still alive after a grace period are counted as orphans (found by process group, and by
   PPID 1 with the run's folder on the command line) and then killed; the plain command is
   run again and must finish; every file under the work and output folders must load
   (``.npy``, ``.pt`` with ``weights_only=True``, ``.nii.gz``, ``.json``/``.jsonl``, ``.zip``,
   the Optuna SQLite study). Also counted: epochs lost per training kill (logged before the
   kill, trained again by the rerun), finished cases predicted again per predict kill, and
   trials lost per tune kill (failed or left running in the study after the rerun).
2. **Disk full** (a tmpfs with half the space the stage needs) and **read-only** (the same
   tmpfs remounted read-only) at each stage: the command must end in one clear line (or
   succeed when it has nothing to write there), leave nothing corrupt, and finish when run
   again once space or write access is back. Needs root (``mount``); skipped otherwise.
3. **The final-checkpoint window**: ``train`` killed on purpose after the last epoch's
   ``checkpoint_latest.pt`` and before ``checkpoint_final.pt`` (watched every millisecond);
   the plain command run again must write the final checkpoint and the validation summary.
4. **Hostile inputs**: the catalogue of issue 11 (NaN voxels, scaled NIfTI labels, a header
   declaring a huge volume, a duplicated archive member, a one-case dataset, a pickled
   checkpoint, ``--folds -1``, a truncated channel file, ...), each run through the CLI and
   classified: refused with a clear message, handled with a warning, traceback, partial files
   left, silent wrong result. ``--validation-tests`` also counts tests/test_validation.py.

Everything runs on tiny synthetic data (4 cases of 16x20x18 voxels, budgets of a few
iterations) so that the default of 20 kills per command fits in about 20 minutes on 2 CPU
cores. Prints ONE JSON object to stdout; progress goes to stderr.

    python benchmarks/bench_faults.py                       # the full suite (root for mounts)
    python benchmarks/bench_faults.py --kills-per-command 1 --only kills --only hostile
    python benchmarks/bench_faults.py --kills-per-command 3 --only final-window   # train only, about 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset950_Faults"
SHAPE = (16, 20, 18)
N_CASES = 4
TRAIN = ["--epochs", "2", "--iterations", "2", "--val-iterations", "1", "-j", "1", "--no-tta"]
# A 2 s heartbeat: a killed worker's trial is failed after 6 s, not after the 3 minutes of the default 60 s.
TUNE = ["--n-trials", "2", "--epochs", "1", "--iterations", "1", "--val-iterations", "1", "-j", "1", "--heartbeat", "2"]
#: the ONNX conversion is left out: it writes through the same atomic zip as the weights, and takes
#: most of an export's time (the kills land on the zip writing either way)
EXPORT = ["-c", "3d_fullres", "--folds", "0", "--no-onnx"]
BUDGET_S = 20 * 60
GRACE_S = 3.0  # time given to workers to notice their parent died before they count as orphans
STAGES = ("plan", "train", "predict", "tune", "export", "import")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- running the CLI


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float

    @property
    def clear_error(self) -> bool:
        """Refused the way the CLI promises: exit 1 or 2, an ``Error`` line, no traceback."""
        return self.returncode in (1, 2) and "Traceback" not in self.output and "Error" in self.output

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.output


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "autoseg.cli", *map(str, args)]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    return env


def start(command: list[str], log: Path) -> subprocess.Popen:
    """A command in a process group of its own, so its workers can be found after the main process dies."""
    handle = open(log, "ab")
    return subprocess.Popen(
        command, cwd=REPO, env=environment(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def run(command: list[str], timeout: float = 600) -> Outcome:
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=timeout, start_new_session=True
    )
    return Outcome(done.returncode, done.stdout + done.stderr, time.perf_counter() - started)


# --------------------------------------------------------------------------- orphans


def _processes() -> Iterator[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, command line) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        yield int(entry.name), int(fields[1]), int(fields[2]), cmdline


def survivors(pgid: int, tag: str) -> list[int]:
    """Processes of a killed run still alive: its process group, or adopted by init naming its folder."""
    me = os.getpid()
    return [
        pid
        for pid, ppid, group, cmdline in _processes()
        if pid != me and (group == pgid or (ppid == 1 and tag in cmdline))
    ]


def reap_orphans(pgid: int, tag: str) -> int:
    """Wait up to GRACE_S for the run's workers to exit; count and kill those that do not."""
    deadline = time.monotonic() + GRACE_S
    while (left := survivors(pgid, tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def kill_at(process: subprocess.Popen, moment: float) -> bool:
    """SIGKILL the main process (only) ``moment`` seconds after it started; False if it finished first."""
    try:
        process.wait(timeout=moment)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


# --------------------------------------------------------------------------- checking files


@dataclass
class FileCheck:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)

    def add(self, other: FileCheck) -> None:
        self.checked += other.checked
        self.corrupt += other.corrupt
        self.temporary += other.temporary


def _load(path: Path) -> None:
    name = path.name
    if name.endswith(".npy"):
        import numpy as np

        np.load(path, allow_pickle=False)
    elif name.endswith(".pt"):
        import torch

        torch.load(path, map_location="cpu", weights_only=True)
    elif name.endswith((".nii.gz", ".nii")):
        import nibabel as nib

        nib.load(str(path)).get_fdata()
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad:
                raise ValueError(f"member {bad} is damaged")
    elif name.endswith(".db"):
        _load_study(path)
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.verify()


def _load_study(path: Path) -> None:
    import sqlite3

    import optuna

    with contextlib.closing(sqlite3.connect(path)) as db:
        if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise ValueError("SQLite integrity check failed")
    storage = f"sqlite:///{path}"
    for summary in optuna.study.get_all_study_summaries(storage):
        optuna.load_study(study_name=summary.study_name, storage=storage).trials  # noqa: B018 (reads every trial)


def check_files(*folders: Path) -> FileCheck:
    """Load every file under ``folders``; hidden ``*.tmp`` files of atomic writes are listed apart."""
    result = FileCheck()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            if path.name.endswith(".tmp"):
                result.temporary.append(str(path))
                continue
            if path.name == ".lock":
                continue
            result.checked += 1
            try:
                _load(path)
            except Exception as exc:  # any failure to load is what this benchmark counts
                result.corrupt.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
    return result


# --------------------------------------------------------------------------- the tiny pipeline


@dataclass
class Baseline:
    """Folders of a finished pipeline, copied as the starting state of each fault."""

    root: Path
    dataset: Path
    planned: Path  # work folder after plan
    trained: Path  # work folder after plan + train fold 0
    scans: Path  # images to predict
    archive: Path  # exported model
    seconds: dict[str, float] = field(default_factory=dict)
    written_bytes: dict[str, int] = field(default_factory=dict)  # what each stage adds: sizes the full disk


def build_baseline(root: Path, every_stage: bool = True) -> Baseline:
    """Run the pipeline once, timing each stage; ``every_stage=False`` stops after ``train``."""
    from autoseg.phantoms import synthetic

    dataset = synthetic.write_nnunet_brain(root / "raw" / DATASET, N_CASES, shape=SHAPE, seed=1)
    scans = root / "scans"
    synthetic.write_msd_brain(root / "held_out", 4, shape=SHAPE, seed=2)
    shutil.copytree(root / "held_out" / "imagesTr", scans)
    base = Baseline(root, dataset, root / "planned", root / "trained", scans, root / "model.zip")
    steps = {
        "plan": cli("plan", "-d", dataset, "-w", base.planned, "-j", "2", "-c", "3d_fullres", "--no-progress"),
        "train": cli("train", "-w", base.trained, "--fold", "0", "--device", "cpu", "--no-progress", *TRAIN),
        "predict": cli(
            "predict",
            "-w",
            base.trained,
            "-i",
            scans,
            "-o",
            root / "predicted",
            "--folds",
            "0",
            "--device",
            "cpu",
            "--no-progress",
        ),
        "export": cli("export", "-w", base.trained, "-o", base.archive, *EXPORT),
        "import": cli("import", base.archive, "-w", root / "imported"),
        "tune": cli("tune", "-w", root / "tuned", "--device", "cpu", "--no-progress", *TUNE),
    }
    for name, command in steps.items():
        if not every_stage and name not in ("plan", "train"):
            continue
        if name == "train":
            shutil.copytree(base.planned, base.trained)
        if name == "tune":
            shutil.copytree(base.planned, root / "tuned")
        before = _folder_bytes(root)
        outcome = run(command)
        if outcome.returncode != 0:
            raise SystemExit(f"the uninterrupted {name} failed, nothing to measure:\n{outcome.output[-3000:]}")
        base.seconds[name] = outcome.seconds
        base.written_bytes[name] = _folder_bytes(root) - before
        say(f"baseline {name}: {outcome.seconds:.1f} s")
    shutil.rmtree(root / "tuned", ignore_errors=True)
    return base


@dataclass
class Stage:
    """One command of the pipeline: how to set up its input state in a folder, and how to run it there."""

    name: str
    prepare: Callable[[Path], None]
    command: Callable[[Path], list[list[str]]]  # one list per process started at once (tune: two workers)
    #: the folder the command writes into (checked after faults; the small file system in the storage suite)
    target: str = "work"


def stages(base: Baseline) -> dict[str, Stage]:
    def copy(source: Path, name: str) -> Callable[[Path], None]:
        return lambda here: shutil.copytree(source, here / name)

    def nothing(here: Path) -> None:
        here.mkdir(parents=True, exist_ok=True)

    def train_cmd(here: Path) -> list[list[str]]:
        return [cli("train", "-w", here / "work", "--fold", "0", "--device", "cpu", "--no-progress", *TRAIN)]

    def tune_cmd(here: Path) -> list[list[str]]:
        one = cli("tune", "-w", here / "work", "--device", "cpu", "--no-progress", *TUNE)
        return [one, one]

    return {
        "plan": Stage(
            "plan",
            nothing,
            lambda h: [
                cli("plan", "-d", base.dataset, "-w", h / "work", "-j", "2", "-c", "3d_fullres", "--no-progress")
            ],
        ),
        "train": Stage("train", copy(base.planned, "work"), train_cmd),
        "predict": Stage(
            "predict",
            nothing,
            lambda h: [
                cli(
                    "predict",
                    "-w",
                    base.trained,
                    "-i",
                    base.scans,
                    "-o",
                    h / "out",
                    "--folds",
                    "0",
                    "--device",
                    "cpu",
                    "--no-progress",
                )
            ],
            target="out",
        ),
        "tune": Stage("tune", copy(base.planned, "work"), tune_cmd),
        "export": Stage(
            "export",
            nothing,
            lambda h: [cli("export", "-w", base.trained, "-o", h / "exported" / "model.zip", *EXPORT)],
            target="exported",
        ),
        "import": Stage("import", nothing, lambda h: [cli("import", base.archive, "-w", h / "work")]),
    }


# --------------------------------------------------------------------------- 1. kills


def _epochs_logged(work: Path) -> int:
    log = work / DATASET / "models" / "3d_fullres" / "fold_0" / "log.jsonl"
    if not log.is_file():
        return 0
    return sum(
        1
        for line in log.read_text().splitlines()
        if line.strip().startswith("{") and '"epoch"' in line and '"event"' not in line
    )


def _resumed_at(work: Path) -> int:
    log = work / DATASET / "models" / "3d_fullres" / "fold_0" / "log.jsonl"
    starts = [json.loads(line) for line in log.read_text().splitlines() if '"event": "start"' in line]
    return starts[-1]["start_epoch"] if starts else 0


def _finished_cases(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.nii.gz")} if out.is_dir() else {}


def _lost_trials(work: Path) -> int:
    import optuna

    lost = 0
    for db in (work / DATASET / "tuning").glob("*.db"):
        storage = f"sqlite:///{db}"
        for summary in optuna.study.get_all_study_summaries(storage):
            trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
            lost += sum(t.state in (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING) for t in trials)
    return lost


def kill_suite(base: Baseline, kills: int, rng: random.Random, scratch: Path) -> dict:
    results = {}
    for stage in stages(base).values():
        length = base.seconds[stage.name]
        figures = {
            "kills_tried": 0,
            "killed_before_the_end": 0,
            "reruns_finished": 0,
            "files_checked": 0,
            "corrupt_files": 0,
            "temporary_files_left": 0,
            "orphan_processes": 0,
            "failures": [],
        }
        per_kill: list[int] = []
        for k in range(kills):
            here = scratch / f"kill_{stage.name}_{k}"
            stage.prepare(here)
            moment = rng.uniform(0.05, 1.0) * length
            processes = [start(c, here.parent / f"{here.name}.log") for c in stage.command(here)]
            victim = rng.randrange(len(processes))
            killed = kill_at(processes[victim], moment)
            orphans = reap_orphans(processes[victim].pid, str(here))
            for i, other in enumerate(processes):  # tune: the other worker finishes its trials
                if i != victim:
                    other.wait()
            before = {"epochs": _epochs_logged(here / "work"), "cases": _finished_cases(here / "out")}
            rerun = run(stage.command(here)[0])
            figures["kills_tried"] += 1
            figures["killed_before_the_end"] += killed
            figures["orphan_processes"] += orphans
            if rerun.returncode == 0:
                figures["reruns_finished"] += 1
            else:
                figures["failures"].append(
                    f"kill {k} at {moment:.1f} s: rerun exit {rerun.returncode}: "
                    f"{rerun.output.strip().splitlines()[-1][:300] if rerun.output.strip() else ''}"
                )
            files = check_files(here / stage.target)
            figures["files_checked"] += files.checked
            figures["corrupt_files"] += len(files.corrupt)
            figures["temporary_files_left"] += len(files.temporary)
            figures["failures"] += files.corrupt
            if stage.name == "train" and rerun.returncode == 0:
                per_kill.append(max(0, before["epochs"] - _resumed_at(here / "work")))
            elif stage.name == "predict":
                after = _finished_cases(here / "out")
                per_kill.append(sum(after.get(n) != v for n, v in before["cases"].items()))
            elif stage.name == "tune":
                per_kill.append(_lost_trials(here / "work"))
            shutil.rmtree(here, ignore_errors=True)
            say(
                f"kill {stage.name} {k + 1}/{kills} at {moment:.1f} s: rerun exit {rerun.returncode}, "
                f"{len(files.corrupt)} corrupt, {orphans} orphan(s)"
            )
        key = {
            "train": "epochs_lost_per_kill",
            "predict": "finished_cases_redone_per_kill",
            "tune": "trials_lost_per_kill",
        }.get(stage.name)
        if key:
            figures[key] = {"max": max(per_kill, default=0), "mean": sum(per_kill) / max(len(per_kill), 1)}
        results[stage.name] = figures
    return results


def _wait_for_final_window(process: subprocess.Popen, folder: Path, last_epoch: int) -> None:
    """Return the moment the last epoch is logged and checkpoint_latest.pt is rewritten after that (the
    final-checkpoint window is open), or when the process ends."""
    log, latest = folder / "log.jsonl", folder / "checkpoint_latest.pt"

    def mtime() -> int:
        return latest.stat().st_mtime_ns if latest.is_file() else 0

    while process.poll() is None and not (log.is_file() and f'"epoch": {last_epoch},' in log.read_text()):
        time.sleep(0.001)
    logged_at = mtime()
    while process.poll() is None and mtime() == logged_at:
        time.sleep(0.001)


def final_window_suite(base: Baseline, kills: int, scratch: Path) -> dict:
    """SIGKILL ``train`` after the last epoch's checkpoint_latest.pt and before checkpoint_final.pt, on purpose.

    The window is a few milliseconds wide, so the run is watched every millisecond and killed the moment the
    last epoch's checkpoint_latest.pt appears; a kill that lands after checkpoint_final.pt was written is
    brought back into the window by deleting it and the validation (the state a kill in the window leaves),
    and counted apart. The plain command run again must write checkpoint_final.pt and the validation summary.
    """
    last_epoch = int(TRAIN[TRAIN.index("--epochs") + 1]) - 1
    figures = {"kills_tried": 0, "landed_in_window": 0, "reruns_finished": 0, "files_checked": 0}
    figures |= {"corrupt_files": 0, "temporary_files_left": 0, "orphan_processes": 0, "failures": []}
    command = stages(base)["train"].command
    for k in range(kills):
        here = scratch / f"final_window_{k}"
        shutil.copytree(base.planned, here / "work")
        folder = here / "work" / DATASET / "models" / "3d_fullres" / "fold_0"
        process = start(command(here)[0], here.parent / f"{here.name}.log")
        _wait_for_final_window(process, folder, last_epoch)
        process.send_signal(signal.SIGKILL)
        process.wait()
        orphans = reap_orphans(process.pid, str(here))
        final = folder / "checkpoint_final.pt"
        figures["landed_in_window"] += not final.is_file()
        final.unlink(missing_ok=True)
        shutil.rmtree(folder / "validation", ignore_errors=True)
        rerun = run(command(here)[0])
        done = rerun.returncode == 0 and final.is_file() and (folder / "validation" / "summary.json").is_file()
        files = check_files(here / "work")
        figures["kills_tried"] += 1
        figures["reruns_finished"] += done
        figures["orphan_processes"] += orphans
        figures["files_checked"] += files.checked
        figures["corrupt_files"] += len(files.corrupt)
        figures["temporary_files_left"] += len(files.temporary)
        figures["failures"] += files.corrupt
        if not done:
            figures["failures"].append(f"final-window kill {k}: rerun exit {rerun.returncode}, no final checkpoint")
        say(f"final-window kill {k + 1}/{kills}: rerun exit {rerun.returncode}, final written {final.is_file()}")
        shutil.rmtree(here, ignore_errors=True)
    return figures


# --------------------------------------------------------------------------- 2. disk full and read-only


@contextlib.contextmanager
def tmpfs(folder: Path, size_bytes: int) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _fill(folder: Path, leave_free: int) -> Path:
    """Occupy all but ``leave_free`` bytes of the file system holding ``folder`` (a hidden file: not checked)."""
    stats = os.statvfs(folder)
    filler = folder / ".filler.tmp"
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = max(0, stats.f_bavail * stats.f_frsize - leave_free)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            f.write(b"\0" * chunk)
            remaining -= chunk
    return filler


def _classify(outcome: Outcome) -> str:
    if outcome.returncode == 0:
        return "succeeded"
    if outcome.clear_error:
        return "clear_error"
    return "traceback" if outcome.traceback else f"exit_{outcome.returncode}"


def _one_line(outcome: Outcome) -> bool:
    """The CLI's promise: the error is one message (a dataset error lists its cases below it)."""
    lines = [line for line in outcome.output.splitlines() if line.strip().startswith("Error")]
    return len(lines) == 1


def storage_suite(base: Baseline, scratch: Path) -> dict:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return {"skipped": "needs root and mount(8) for a tmpfs"}
    results = {}
    for stage in stages(base).values():
        needed = max(base.written_bytes[stage.name], 1 << 16)
        for fault in ("disk_full", "read_only"):
            here = scratch / f"{fault}_{stage.name}"
            stage.prepare(here)
            target = here / stage.target
            staged = here / "staged"
            if target.exists():  # the stage's own data move onto the small file system
                shutil.move(target, staged)
            with tmpfs(target, _folder_bytes(here) + needed + (4 << 20)):
                for item in staged.iterdir() if staged.exists() else ():
                    shutil.move(str(item), target / item.name)
                command = stage.command(here)[0]
                filler = _fill(target, needed // 2) if fault == "disk_full" else None
                if fault == "read_only":
                    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
                outcome = run(command)
                files = check_files(target)
                if fault == "read_only":
                    subprocess.run(["mount", "-o", "remount,rw", str(target)], check=True)
                if filler is not None:
                    filler.unlink()
                rerun = run(command)
                after = check_files(target)
            results[f"{stage.name}/{fault}"] = {
                "outcome": _classify(outcome),
                "one_line": outcome.returncode == 0 or _one_line(outcome),
                "message": next((line.strip() for line in outcome.output.splitlines() if "Error" in line), "")[:300],
                "corrupt_files": files.corrupt + after.corrupt,
                "rerun_finished": rerun.returncode == 0,
                "rerun_message": "" if rerun.returncode == 0 else rerun.output.strip()[-300:],
            }
            shutil.rmtree(here, ignore_errors=True)
            say(
                f"{fault} {stage.name}: {results[f'{stage.name}/{fault}']['outcome']}, rerun "
                f"{'ok' if rerun.returncode == 0 else 'FAILED'}"
            )
    return results


# --------------------------------------------------------------------------- 3. hostile inputs


@dataclass
class Hostile:
    """One bad input: how to make it, the command, what counts as right, and where files must not appear."""

    name: str
    make: Callable[[Path, Baseline], list[str]]  # returns the command
    expect: str  # "refuse": exit 1/2 with a clear message; "warn": exit 0 with a warning naming it
    says: str  # a regular expression the message must match
    no_files: Callable[[Path], list[Path]] = lambda here: []


def _dataset_copy(here: Path, base: Baseline) -> Path:
    return Path(shutil.copytree(base.dataset, here / DATASET))


def _nan_scan(here: Path, base: Baseline) -> list[str]:
    import nibabel as nib
    import numpy as np

    shutil.copytree(base.scans, here / "scans")
    path = here / "scans" / sorted(p.name for p in base.scans.iterdir())[0]
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    data[(0,) * data.ndim] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return cli(
        "predict",
        "-w",
        base.trained,
        "-i",
        here / "scans",
        "-o",
        here / "out",
        "--folds",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    )


def _scaled_label(here: Path, base: Baseline) -> list[str]:
    import nibabel as nib
    import numpy as np

    dataset = _dataset_copy(here, base)
    label = sorted((dataset / "labelsTr").iterdir())[0]
    image = nib.load(str(label))
    scaled = nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine, image.header)
    scaled.header.set_data_dtype(np.int16)
    scaled.header.set_slope_inter(0.5, 0.0)  # real values 0, 0.5, 1, 1.5: not whole label values
    nib.save(scaled, str(label))
    return cli("plan", "-d", dataset, "-w", here / "work", "-j", "1", "--no-preprocess", "--no-progress")


def _huge_header(here: Path, base: Baseline) -> list[str]:
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 512))
    header.set_data_dtype(np.float32)
    path = here / "huge.nii.gz"
    here.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
    return cli("show", path, "-o", here / "huge.png")


def _duplicate_member(here: Path, base: Baseline) -> list[str]:
    here.mkdir(parents=True, exist_ok=True)
    evil = here / "twice.zip"
    with zipfile.ZipFile(base.archive) as source, zipfile.ZipFile(evil, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        plans = next(n for n in source.namelist() if n.endswith("plans.json"))
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            target.writestr(plans, "{broken")
    return cli("import", evil, "-w", here / "work")


def _one_case(here: Path, base: Baseline) -> list[str]:
    from autoseg.phantoms import synthetic

    dataset = synthetic.write_nnunet_brain(here / "Dataset951_One", 1, shape=SHAPE)
    return cli("plan", "-d", dataset, "-w", here / "work", "-j", "1", "--no-preprocess", "--no-progress")


def _all_background(here: Path, base: Baseline) -> list[str]:
    import nibabel as nib
    import numpy as np

    dataset = _dataset_copy(here, base)
    for label in (dataset / "labelsTr").iterdir():
        image = nib.load(str(label))
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine, image.header), str(label))
    return cli("plan", "-d", dataset, "-w", here / "work", "-j", "1", "--no-preprocess", "--no-progress")


def _pickled_checkpoint(here: Path, base: Baseline) -> list[str]:
    import argparse as ap

    import torch

    work = Path(shutil.copytree(base.trained, here / "work"))
    checkpoint = work / DATASET / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    torch.save({"version": 1, "weights": {}, "args": ap.Namespace(x=1)}, checkpoint)
    return cli(
        "predict", "-w", work, "-i", base.scans, "-o", here / "out", "--folds", "0", "--device", "cpu", "--no-progress"
    )


def _negative_fold(here: Path, base: Baseline) -> list[str]:
    return cli("predict", "-w", base.trained, "-i", base.scans, "-o", here / "out", "--folds", "-1")


def _truncated_channel(here: Path, base: Baseline) -> list[str]:
    dataset = _dataset_copy(here, base)
    channel = sorted((dataset / "imagesTr").iterdir())[1]
    channel.write_bytes(channel.read_bytes()[:200])
    return cli("plan", "-d", dataset, "-w", here / "work", "-j", "1", "--no-preprocess", "--no-progress")


def _read_only_output(here: Path, base: Baseline) -> list[str]:
    """-o inside a read-only folder: a read-only tmpfs as root (root ignores file modes), else mode 555."""
    locked = here / "locked"
    locked.mkdir(parents=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(locked)], check=True)
    else:
        locked.chmod(0o555)
    return cli(
        "predict",
        "-w",
        base.trained,
        "-i",
        base.scans,
        "-o",
        here / "locked" / "out",
        "--folds",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    )


CATALOGUE = (
    Hostile("predict: a NaN voxel", _nan_scan, "refuse", r"NaN", lambda h: [h / "out" / "BRATS_001.nii.gz"]),
    Hostile("plan: an int16 label scaled by 0.5", _scaled_label, "refuse", r"BRATS_001", lambda h: [h / "work"]),
    Hostile(
        "show: a tiny .nii.gz declaring 1024x1024x512 float32",
        _huge_header,
        "refuse",
        r"huge\.nii\.gz",
        lambda h: [h / "huge.png"],
    ),
    Hostile(
        "import: two plans.json members",
        _duplicate_member,
        "refuse",
        r"plans\.json|twice",
        lambda h: [h / "work" / DATASET],
    ),
    Hostile("plan: a one-case dataset", _one_case, "warn", r"cross-validation"),
    Hostile("plan: every label map background", _all_background, "warn", r"background only"),
    Hostile(
        "predict: a pickled checkpoint",
        _pickled_checkpoint,
        "refuse",
        r"not a plain-weights checkpoint",
        lambda h: [h / "out"],
    ),
    Hostile("predict: --folds -1", _negative_fold, "refuse", r"not a fold", lambda h: [h / "out"]),
    Hostile("plan: a truncated channel file", _truncated_channel, "refuse", r"_0001\.nii\.gz", lambda h: [h / "work"]),
    Hostile(
        "predict: -o under a read-only folder", _read_only_output, "refuse", r"locked", lambda h: [h / "locked" / "out"]
    ),
)


def hostile_suite(base: Baseline, scratch: Path, validation_tests: bool) -> dict:
    figures = {
        "inputs_tried": 0,
        "refused_clearly": 0,
        "warned": 0,
        "tracebacks": 0,
        "partial_files_left": 0,
        "silent_wrong_results": 0,
        "cases": {},
    }
    for case in CATALOGUE:
        here = scratch / re.sub(r"\W+", "_", case.name)
        outcome = run(case.make(here, base))
        text = " ".join(outcome.output.split())
        left = [str(p) for p in case.no_files(here) if p.exists()]
        named = re.search(case.says, text) is not None
        if outcome.traceback:
            verdict = "traceback"
        elif case.expect == "refuse":  # predict reports a refused case by name, without an "Error:" prefix
            verdict = (
                "refused"
                if outcome.returncode in (1, 2) and named
                else "silent_wrong"
                if outcome.returncode == 0
                else "unclear_error"
            )
        else:
            verdict = (
                "warned"
                if outcome.returncode == 0 and named
                else "silent"
                if outcome.returncode == 0
                else "refused_instead"
            )
        figures["inputs_tried"] += 1
        figures["refused_clearly"] += verdict == "refused"
        figures["warned"] += verdict == "warned"
        figures["tracebacks"] += verdict == "traceback"
        figures["silent_wrong_results"] += verdict in ("silent_wrong", "silent")
        figures["partial_files_left"] += bool(left)
        figures["cases"][case.name] = {
            "verdict": verdict,
            "exit": outcome.returncode,
            "seconds": outcome.seconds,
            "partial_files": left,
            "message": _message(outcome.output),
        }
        _release(here)
        shutil.rmtree(here, ignore_errors=True)
        say(f"hostile {case.name}: {verdict}")
    if validation_tests:
        figures["validation_tests"] = _count_validation_tests()
    return figures


def _release(here: Path) -> None:
    """Unmount what a hostile input mounted under ``here`` and make its folders writable again."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in mounts:
        if mount.startswith(str(here)):
            subprocess.run(["umount", "-l", mount], check=False)
    with contextlib.suppress(OSError):
        for path in [here, *here.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)


def _message(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("Error", "WARNING")) or line.endswith("failed")]
    return " ".join(said or lines[-1:])[:300]


def _count_validation_tests() -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_validation.py"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
    )
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|error)", done.stdout))
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)}


# --------------------------------------------------------------------------- main


def code_state() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "autoseg"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {"commit": head, "uncommitted_changes": bool(dirty)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills-per-command", type=int, default=20, help="SIGKILLs per command (default 20).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments and of the killed worker.")
    parser.add_argument(
        "--only",
        action="append",
        choices=("kills", "final-window", "storage", "hostile"),
        help="Run only these parts (repeatable); default: all four.",
    )
    parser.add_argument(
        "--validation-tests", action="store_true", help="Also run tests/test_validation.py and count its refusals."
    )
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one).")
    args = parser.parse_args()
    parts = set(args.only or ("kills", "final-window", "storage", "hostile"))
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autoseg-faults-")))
        root.mkdir(parents=True, exist_ok=True)
        base = build_baseline(root / "baseline", every_stage=bool(parts - {"final-window"}))
        estimate = _estimate_s(base, args.kills_per_command, parts)
        say(f"estimated {estimate / 60:.0f} min for the suite after the baseline")
        if estimate > BUDGET_S:
            say(f"warning: above the {BUDGET_S // 60} min budget; fewer --kills-per-command would fit")
        report: dict = {
            "benchmark": "faults",
            "code": code_state(),
            "seed": args.seed,
            "kills_per_command": args.kills_per_command,
            "cases": N_CASES,
            "shape": list(SHAPE),
            "baseline_seconds": base.seconds,
        }
        if "kills" in parts:
            report["kills"] = kill_suite(base, args.kills_per_command, random.Random(args.seed), root / "kills")
        if "final-window" in parts:
            report["final_window_kills"] = final_window_suite(base, args.kills_per_command, root / "final_window")
        if "storage" in parts:
            report["storage"] = storage_suite(base, root / "storage")
        if "hostile" in parts:
            report["hostile_inputs"] = hostile_suite(base, root / "hostile", args.validation_tests)
        report["totals"] = _totals(report)
        report["wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


def _estimate_s(base: Baseline, kills: int, parts: set[str]) -> float:
    """A kill costs on average half a run, the grace period and a whole rerun; a storage fault two runs."""
    total = 0.0
    if "kills" in parts:
        total += kills * sum(1.5 * s + GRACE_S for s in base.seconds.values())
    if "final-window" in parts:
        total += kills * 2 * base.seconds["train"]
    if "storage" in parts:
        total += 2 * 2 * sum(base.seconds.values())
    return total


def _totals(report: dict) -> dict:
    kills = [
        *report.get("kills", {}).values(),
        *([report["final_window_kills"]] if "final_window_kills" in report else []),
    ]
    storage = [v for v in report.get("storage", {}).values() if isinstance(v, dict)]
    hostile = report.get("hostile_inputs", {})
    return {
        "kills_tried": sum(k["kills_tried"] for k in kills),
        "reruns_finished": sum(k["reruns_finished"] for k in kills),
        "files_checked": sum(k["files_checked"] for k in kills),
        "corrupt_files": sum(k["corrupt_files"] for k in kills) + sum(len(s["corrupt_files"]) for s in storage),
        "orphan_processes": sum(k["orphan_processes"] for k in kills),
        "storage_faults_unclear": sum(
            s["outcome"] not in ("succeeded", "clear_error") or not s["one_line"] for s in storage
        ),
        "storage_reruns_failed": sum(not s["rerun_finished"] for s in storage),
        "tracebacks": hostile.get("tracebacks", 0) + sum(s["outcome"] == "traceback" for s in storage),
        "silent_wrong_results": hostile.get("silent_wrong_results", 0),
        "partial_files_left": hostile.get("partial_files_left", 0),
    }


if __name__ == "__main__":
    main()
