"""Progress bars for long loops, switchable off (tests, logs, ``--no-progress``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Context yielding ``advance(info="", step=1)``; draws a rich bar (with ETA and ``info``) on a terminal only.

    ``step=0`` only updates ``info`` (e.g. the tile a long case is at).
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda info="", step=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, info="")
        yield lambda info="", step=1: progress.update(task, advance=step, info=info)
