"""``autoseg evaluate``: score a folder of predicted masks against the truth (summary.json, metrics.csv)."""

from __future__ import annotations

from pathlib import Path

from autoseg.core.errors import OptionError
from autoseg.data.evaluation.evaluate import LABEL_CONVENTIONS, REGION_PRESETS, evaluate_folders
from autoseg.data.evaluation.lesions import LesionRule


def evaluate(
    *,
    predictions: Path,
    truth: Path,
    output: Path | None = None,
    labels: str = "consecutive",
    regions: str | None = None,
    dataset_json: Path | None = None,
    lesion_wise: bool = False,
    lesion_dilation: int = 3,
    lesion_min_volume: float = 50.0,
    show_progress: bool = True,
) -> dict:
    """Check the label convention and regions by name, then :func:`evaluate_folders` (lesion-wise with
    ``lesion_wise``: truth fragments merged by ``lesion_dilation``, lesions up to ``lesion_min_volume`` mm3
    not scored)."""
    if labels not in LABEL_CONVENTIONS:
        raise OptionError(f"choose {' or '.join(LABEL_CONVENTIONS)}", "--labels")
    if regions is not None and regions not in REGION_PRESETS:
        raise OptionError(f"choose {' or '.join(REGION_PRESETS)}", "--regions")
    rule = LesionRule(lesion_dilation, lesion_min_volume) if lesion_wise else None
    return evaluate_folders(
        predictions=predictions,
        truth=truth,
        labels=labels,
        regions=regions,
        output=output,
        dataset_json=dataset_json,
        lesion_rule=rule,
        show_progress=show_progress,
    )
