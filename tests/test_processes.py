"""Workers and locks of a command end with it: the fold lock is not inherited, SIGTERM unwinds."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

from autoseg.core.processes import lock_exclusive


def _work(started) -> None:
    started.set()
    time.sleep(60)


def test_a_forked_child_does_not_hold_its_parents_lock(tmp_path):
    lock = lock_exclusive(tmp_path / ".lock", "process 1")
    assert lock_exclusive(tmp_path / ".lock", "process 2") is None  # held
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_work, args=(started,))
    child.start()
    try:
        assert started.wait(30)
        lock.close()  # the parent ends its run while a worker it forked lives on
        again = lock_exclusive(tmp_path / ".lock", "process 2")
        assert again is not None
        again.close()
    finally:
        child.kill()
        child.join()


#: run in a fresh interpreter: see the test's docstring
_SIGTERM_SCRIPT = """
import os, signal, time
from autoseg.core.processes import Terminated, sigterm_as_interrupt
before = signal.getsignal(signal.SIGTERM)
try:
    with sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    print("not-interrupted")
except Terminated:
    print("terminated")
print("restored" if signal.getsignal(signal.SIGTERM) == before else "not-restored")
"""


def test_sigterm_raises_terminated_inside_the_block_only():
    """In a fresh interpreter, not the pytest process: sent to the pytest process itself, after the INT8
    tests had run OpenVINO and ONNX Runtime in it, this SIGTERM crashed the whole suite with a
    segmentation fault (not reproduced outside pytest; the cause is not known)."""
    result = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["terminated", "restored"]
