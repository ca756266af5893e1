"""Workers and locks of a command end with it: the fold lock is not inherited, SIGTERM unwinds."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from autoseg.core.processes import Terminated, lock_exclusive, sigterm_as_interrupt


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


def test_sigterm_raises_terminated_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    assert signal.getsignal(signal.SIGTERM) == before


def _hold_and_die(path, ready) -> None:
    """Take the lock, fork a worker that outlives this process, then die without releasing anything."""
    lock = lock_exclusive(path, "process 1")
    assert lock is not None
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    worker.start()
    ready.put(worker.pid)
    ready.close()
    ready.join_thread()  # the pid reaches the test before this process dies
    os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX only")
def test_a_killed_holders_orphaned_worker_does_not_keep_the_lock(tmp_path):
    context = multiprocessing.get_context("fork")
    ready = context.Queue()
    holder = context.Process(target=_hold_and_die, args=(tmp_path / ".lock", ready))
    holder.start()
    orphan = ready.get(timeout=30)
    deadline = time.monotonic() + 30
    while holder.exitcode is None and time.monotonic() < deadline:  # join() would wait for the orphan too
        time.sleep(0.05)
    try:
        again = lock_exclusive(tmp_path / ".lock", "process 2")
        assert again is not None
        again.close()
    finally:
        os.kill(orphan, signal.SIGKILL)
