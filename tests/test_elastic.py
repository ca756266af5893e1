"""torchrun elastic restarts: a DDP rank SIGKILLed mid-epoch, the group restarted, training resumed.

Two gloo processes on CPU train under ``torchrun --max-restarts 1``. Rank 1 is killed in the
middle of an epoch; torchrun stops rank 0 and starts both again, and every rank must continue
from ``checkpoint_latest.pt`` (even though the launch said ``--no-resume``), losing at most the
epoch in progress, and end with identical weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import load_checkpoint
from autoseg.phantoms import synthetic

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4


def _log(folder: Path) -> list[dict]:
    path = folder / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _epochs(folder: Path) -> list[int]:
    return [e["epoch"] for e in _log(folder) if "epoch" in e]


def _saved_epoch(folder: Path) -> int:
    latest = folder / "checkpoint_latest.pt"  # replaced atomically: never read half-written
    return load_checkpoint(latest)["epoch"] if latest.is_file() else -1


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # the process ended meanwhile
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _rank_process(launcher: int, rank: int) -> int | None:
    """The worker torchrun started for ``rank`` in its first attempt (RANK and restart count in its environment)."""
    for pid in _children(launcher):
        try:
            environ = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except OSError:
            continue
        if environ.get("RANK") == str(rank) and environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            return pid
    return None


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_rank_is_killed_and_every_rank_resumes(tmp_path):
    dataset = synthetic.write_msd_brain(tmp_path / "raw", 5, shape=(24, 28, 26))
    work = tmp_path / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    folder = work / "raw" / "models" / "3d_fullres" / "fold_0"
    output = tmp_path / "torchrun.log"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "autoseg.cli",
        "train",
        "-w",
        str(work),
        "--fold",
        "0",
        "--epochs",
        str(EPOCHS),
        "--iterations",
        "6",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-validate",
        "--no-resume",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    with open(output, "w") as sink:
        launcher = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        while _saved_epoch(folder) < 1:  # epochs 0 and 1 are done and saved
            assert launcher.poll() is None and time.time() < deadline, output.read_text(errors="replace")[-4000:]
            time.sleep(0.1)
        time.sleep(0.5)  # both ranks are now inside epoch 2
        done_before = len(_epochs(folder))
        victim = _rank_process(launcher.pid, 1)
        assert victim is not None and done_before < EPOCHS, (done_before, output.read_text(errors="replace")[-4000:])
        os.kill(victim, signal.SIGKILL)
        launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=60)
    text = output.read_text(errors="replace")
    assert launcher.returncode == 0, text[-4000:]

    log = _log(folder)
    starts = [e for e in log if e.get("event") == "start"]
    assert len(starts) == 2, starts  # the first launch and torchrun's restart (the first start is kept)
    assert starts[0]["start_epoch"] == 0
    assert done_before - 1 <= starts[1]["start_epoch"] <= done_before  # at most the epoch in progress was lost
    assert _epochs(folder) == list(range(EPOCHS))  # every epoch once: the log was cut back to the checkpoint
    end = [e for e in log if e.get("event") == "end"][-1]
    assert len(end["weight_digests"]) == 2 and end["weight_digests"][0] == end["weight_digests"][1], end
    assert load_checkpoint(folder / "checkpoint_final.pt")["epoch"] == EPOCHS - 1


RESTARTED_GROUP = """
import os, time, torch, torch.distributed as dist
from autoseg.training.distributed import init_distributed, shutdown
attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
if attempt == "1" and rank == "1":
    time.sleep(5)  # rank 0 reaches the connection keys first, while only the dead group's are there
context = init_distributed("cpu")
total = torch.ones(1)
dist.all_reduce(total)
if attempt == "0" and rank == "1":
    os.kill(os.getpid(), 9)
dist.all_reduce(total)
print(f"attempt {attempt} rank {rank}: {total.item():.0f}", flush=True)
shutdown(context)
"""


@pytest.mark.slow
def test_a_restarted_group_never_connects_to_the_dead_groups_processes(tmp_path):
    """torchrun shares one store across restarts (pytorch#135712); each attempt must get its own keys."""
    script = tmp_path / "group.py"
    script.write_text(RESTARTED_GROUP)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            str(script),
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "attempt 1 rank 0: 4" in result.stdout and "attempt 1 rank 1: 4" in result.stdout, result.stdout
