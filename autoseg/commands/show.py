"""``autoseg show``: draw a case (every channel, three orientations, label contours) and print its facts."""

from __future__ import annotations

from pathlib import Path

from autoseg.visual.cases import load_view
from autoseg.visual.render import case_facts, render_case, save_figure


def show(
    *,
    case: str,
    label: Path | None = None,
    prediction: Path | None = None,
    overlay: Path | None = None,
    output: Path | None = None,
    dataset: str | None = None,
    workdir: Path | None = None,
) -> list[str]:
    """Write the figure (default ``<case id>.png``); returns the lines ``show`` prints."""
    view = load_view(case, label=label, prediction=prediction, overlay=overlay, workdir=workdir, dataset=dataset)
    path = save_figure(render_case(view), output if output is not None else Path(f"{view.case_id}.png"))
    return [case_facts(view), f"wrote {path}"]
