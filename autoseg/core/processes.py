"""Worker processes that end with the command that started them, and locks only that command holds.

autoseg forks workers: :func:`autoseg.core.parallel.parallel_map`'s pool (``plan -j``) and
batchgenerators' augmenters (``train``). Nothing of a stopped command may keep running:

* **Workers die with their parent.** Each worker calls :func:`die_with_parent` first: on
  Linux the kernel then kills it the moment its parent dies, even by ``kill -9`` (a
  parent-death signal); elsewhere a watchdog thread notices within a second.
* **SIGTERM unwinds like Ctrl-C.** :func:`sigterm_as_interrupt` turns SIGTERM into
  :class:`Terminated` (a ``KeyboardInterrupt``), so ``finally`` blocks run and every
  Ctrl-C path (the augmenters' shutdown, the pool's cancellation) stops the workers.
* **Locks belong to one process.** A forked child shares its parent's open files, and
  with them OS locks: an orphaned worker would keep a killed run's lock. Locks taken with
  :func:`lock_exclusive` are released in every forked child, so the lock lives exactly as
  long as the process that took it (and is released by the OS when it dies).
* **Every platform.** Locks are ``filelock``'s (``flock`` on POSIX, ``msvcrt`` on Windows);
  the POSIX-only calls (``prctl``, ``sigaltstack``, fork hooks) run behind a platform check,
  so no command needs ``fcntl`` to start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

#: prctl(2) option: the signal the kernel sends this process when its parent thread ends.
PR_SET_PDEATHSIG = 1
WATCHDOG_INTERVAL_S = 1.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


def die_with_parent(parent_pid: int) -> None:
    """Call first in a worker forked by ``parent_pid``: the worker ends as soon as that process does.

    The parent-death signal fires when the *thread* that forked the worker ends, so fork
    workers from a thread that outlives them (autoseg forks from the main thread). SIGTERM
    goes back to its default: a worker has nothing to clean up, its parent does that.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_INTERVAL_S)
    os._exit(1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (a second SIGTERM kills).

    Outside the main thread (where Python cannot set handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class _SignalStack(ctypes.Structure):
    """``stack_t`` of sigaltstack(2)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Give this thread back its alternate signal stack after the block.

    OpenVINO's CPU plugin installs an alternate signal stack of its own on the thread that compiles or
    runs a model and unmaps it when the model is freed, without restoring the previous one. Python's
    signal handlers run on the alternate stack (SA_ONSTACK), so the next SIGTERM or Ctrl-C would then
    crash the process (a segmentation fault) instead of unwinding. Linux only; elsewhere the block
    runs unchanged.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(saved))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


class ProcessLock:
    """An exclusive OS lock held by the process that took it, not by the children it forks."""

    def __init__(self, lock: FileLock) -> None:
        self._lock = lock
        self._owner = os.getpid()
        _HELD.add(self)

    def close(self) -> None:
        """Release the lock (the OS releases it anyway when this process ends)."""
        _HELD.discard(self)
        if os.getpid() == self._owner:
            self._lock.release(force=True)


_HELD: set[ProcessLock] = set()


def holder_path(path: Path) -> Path:
    """The file beside a lock that names its holder (the lock file itself may be truncated by a contender)."""
    return path.with_name(path.name + ".holder")


def lock_holder(path: Path) -> str:
    """Who holds the lock at ``path``, as :func:`lock_exclusive`'s note said; empty when unknown."""
    try:
        return holder_path(path).read_text().strip()
    except OSError:
        return ""


def lock_exclusive(path: Path, note: str) -> ProcessLock | None:
    """Lock ``path`` and write ``note`` (who holds it) beside it; None when another process holds the lock."""
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    holder_path(path).write_text(note)
    return ProcessLock(lock)


@contextlib.contextmanager
def hold_lock(path: Path) -> Iterator[None]:
    """An exclusive OS lock on ``path`` for the block, waiting for it; a killed holder leaves none behind."""
    with FileLock(str(path)):
        yield


def _forget_locks_in_child() -> None:
    """Runs in every forked child: the parent keeps its locks, the child never releases them."""
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows spawns, and a spawned child inherits no lock
    os.register_at_fork(after_in_child=_forget_locks_in_child)
