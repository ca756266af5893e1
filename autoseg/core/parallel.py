"""Process-parallel map with a progress bar and per-worker peak memory.

Workers are forked processes (cheap start, nothing to re-import) that die with the
calling process, even when it is killed (:func:`autoseg.core.processes.die_with_parent`);
``workers=1`` runs in the calling process, which keeps tracebacks and debuggers simple.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from autoseg.core.processes import die_with_parent
from autoseg.core.progress import progress_bar


@dataclass
class WorkerPeak:
    """Peak resident memory of the workers (bytes), for benchmarks and memory goals.

    ``above_idle_bytes`` is the most any single item added on top of what its worker
    held when the item started (interpreter, libraries, allocator caches): what the
    work on one case itself costs.
    """

    bytes: int = 0
    above_idle_bytes: int = 0

    def update(self, peak: int, start: int) -> None:
        self.bytes = max(self.bytes, peak)
        self.above_idle_bytes = max(self.above_idle_bytes, peak - start)


def _current_rss() -> int:
    """This process's resident memory (Linux's /proc; 0 where there is none, e.g. Windows)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def _reset_peak_rss() -> None:
    """Restart this process's high-water mark at its current RSS (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "win32":  # no resource module (POSIX only): peak memory is not measured there
        return 0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _call_with_rss(fn: Callable, item: Any) -> tuple[Any, int, int]:
    start = _current_rss()
    _reset_peak_rss()
    result = fn(item)
    return result, _peak_rss(), start


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    description: str,
    show_progress: bool = True,
    peak: WorkerPeak | None = None,
) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item, in completion order, with a progress bar."""
    items = list(items)
    peak = peak if peak is not None else WorkerPeak()
    with progress_bar(description, total=len(items), enabled=show_progress) as advance:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                result, rss, start = _call_with_rss(fn, item)
                peak.update(rss, start)
                advance()
                yield result
            return
        # fork where the platform has it (POSIX); Windows only spawns
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(items)),
            mp_context=context,
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = [pool.submit(_call_with_rss, fn, item) for item in items]
            try:
                for future in as_completed(futures):
                    result, rss, start = future.result()
                    peak.update(rss, start)
                    advance()
                    yield result
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
