"""The one table formatter: every table the command line prints (plan, evaluate, select, tune, demo).

Modules that own the numbers (evaluation, selection, tuning) build their rows of strings and call
:func:`table`; the CLI prints them with :func:`print_tables`. So every table has the same look:
a title, text columns left, number columns right, the row that matters in bold, and the whole
table kept on one line per row in logs and pipes. rich is imported on use, keeping
``autoseg --help`` fast.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

#: Console width when stdout is not a terminal (a log file, a pipe): wide enough that no table wraps.
PIPE_WIDTH = 160


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Collection[int] = (),
    bold: Collection[int] = (),
) -> Any:
    """A rich Table: ``columns`` named in order, those at the indices in ``right`` (numbers)
    right-aligned, one row per sequence of cell strings, the rows at the indices in ``bold`` bold."""
    from rich.table import Table

    out = Table(title=title)
    for index, name in enumerate(columns):
        out.add_column(name, justify="right" if index in right else "left")
    for index, row in enumerate(rows):
        out.add_row(*row, style="bold" if index in bold else None)
    return out


def print_tables(*items: Any) -> None:
    """Print tables (and lines of rich markup between them) to stdout: the terminal's width on a
    terminal, :data:`PIPE_WIDTH` elsewhere."""
    import sys

    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)
    for item in items:
        console.print(item)
