"""Full-volume validation: predict every validation case like ``autoseg predict`` would,
export it to the original geometry and score it against the raw label.

The class probabilities are kept too (``<case>.npz``, the format of ``autoseg predict
--save-probabilities``): ``autoseg select`` averages them to score ensembles of configurations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.core.files import write_json
from autoseg.core.progress import progress_bar
from autoseg.data.datasets import CaseFiles, DatasetSpec
from autoseg.data.evaluation import dice_per_class, mean_scores
from autoseg.data.images import read_channels, read_label, write_label
from autoseg.data.restore import to_output_values, write_probabilities

if TYPE_CHECKING:
    from autoseg.inference.predictor import Predictor

log = logging.getLogger(__name__)
SUMMARY_VERSION = 1


def validate_cases(predictor: "Predictor", cases: list[CaseFiles], spec: DatasetSpec, out_dir: Path,
                   show_progress: bool = True) -> dict:
    """Predict, export and score every case; writes predictions, probabilities and ``summary.json``."""
    plan = predictor.plan
    per_case = {}
    regions = [(r.name, r.labels) for r in plan.regions]
    with progress_bar("Validating", len(cases), show_progress) as advance:
        for case in cases:
            data, geometry = read_channels(case.images)
            labels, probabilities = predictor.labels_and_probabilities(np.asarray(data, dtype=np.float32), geometry,
                                                                       with_probabilities=True)
            write_probabilities(out_dir / f"{case.case_id}.npz", probabilities, plan)
            write_label(to_output_values(labels, plan), geometry, out_dir / f"{case.case_id}.nii.gz")
            truth = spec.consecutive_labels(read_label(case.label)[0])
            per_case[case.case_id] = dice_per_class(labels, truth, plan.labels, regions)
            advance()
    summary = {"version": SUMMARY_VERSION, "metric": "dice", "tta": predictor.tta,
               "mean": mean_scores(per_case), "cases": per_case}
    write_json(out_dir / "summary.json", summary)
    log.info("validation Dice: %s", ", ".join(f"{k} {v:.3f}" for k, v in summary["mean"].items()))
    return summary
