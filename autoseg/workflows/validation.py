"""Full-volume validation: predict every validation case like ``autoseg predict`` would,
export it to the original geometry and score it against the raw label.

After training the predictions are kept, with their class probabilities (``<case>.npz``, the
format of ``autoseg predict --save-probabilities``): ``autoseg select`` averages them to score
ensembles of configurations. During training (:class:`RealValidation`) only the Dice is kept. A stage that a
cascade reads (``3d_lowres``) also leaves its masks on the cascade's grid (:func:`write_stage_masks`).
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.core.files import atomic_write_bytes, read_json, write_json
from autoseg.core.plan import Plan
from autoseg.core.progress import progress_bar
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.evaluation.evaluate import dice_per_class, mean_scores
from autoseg.data.io.datasets import CaseFiles, DatasetSpec
from autoseg.data.io.images import read_channels, read_label, write_label
from autoseg.data.preprocessing.pipeline import PreprocessingRecord
from autoseg.data.preprocessing.restore import to_output_values, write_probabilities

if TYPE_CHECKING:
    from autoseg.inference.predictor import Predictor

log = logging.getLogger(__name__)
SUMMARY_VERSION = 1
#: Validation during training scores at most this many cases of a fold: a fixed, seeded subset.
MAX_TRAINING_VALIDATION_CASES = 50
SUBSET_SEED = 0


def validate_cases(
    predictor: Predictor, cases: list[CaseFiles], spec: DatasetSpec, out_dir: Path, show_progress: bool = True
) -> dict:
    """Predict, export and score every case; writes predictions, probabilities and ``summary.json``."""
    per_case = {}
    with progress_bar("Validating", len(cases), show_progress) as advance:
        for case in cases:
            per_case[case.case_id] = score_case(predictor, case, spec, out_dir)
            advance()
    summary = {
        "version": SUMMARY_VERSION,
        "metric": "dice",
        "tta": predictor.tta,
        "mean": mean_scores(per_case),
        "cases": per_case,
    }
    write_json(out_dir / "summary.json", summary)
    log.info("validation Dice: %s", ", ".join(f"{k} {v:.3f}" for k, v in summary["mean"].items()))
    return summary


def score_case(predictor: Predictor, case: CaseFiles, spec: DatasetSpec, out_dir: Path | None) -> dict[str, float]:
    """Predict one case in full and score it against its raw label (Dice per label and region); with
    ``out_dir``, also write the mask and the probabilities there."""
    plan = predictor.plan
    data, geometry = read_channels(case.images)
    labels, probabilities = predictor.labels_and_probabilities(
        np.asarray(data, dtype=np.float32), geometry, with_probabilities=out_dir is not None
    )
    if out_dir is not None:
        write_probabilities(out_dir / f"{case.case_id}.npz", probabilities, plan)
        write_label(to_output_values(labels, plan), geometry, out_dir / f"{case.case_id}.nii.gz")
    truth = spec.consecutive_labels(read_label(case.label)[0])
    return dice_per_class(labels, truth, plan.labels, [(r.name, r.labels) for r in plan.regions])


def write_stage_masks(
    workspace: DatasetWorkspace,
    plan: Plan,
    configuration: str,
    fold: str,
    validation: Path,
    case_ids: Sequence[str],
    spec: DatasetSpec,
) -> None:
    """The fold's validation masks (``validation/<case>.nii.gz``), for the cascade stages that read
    ``configuration``, put on each stage's preprocessed grid as preprocessing puts labels there, into
    :meth:`DatasetWorkspace.next_stage`: what those stages train on (nnU-Net's ``predicted_next_stage``)."""
    stages = {plan.configuration(s).data_identifier: plan.configuration(s) for s in plan.next_stages(configuration)}
    for identifier, stage in stages.items():
        folder = workspace.next_stage(configuration, fold, identifier)
        for case_id in case_ids:
            record = workspace.preprocessed(identifier) / f"{case_id}.json"
            if not record.is_file():
                log.warning(
                    "%s: case %s is not preprocessed for %s, so %s cannot train on this fold's mask of it; run "
                    "`autoseg plan`, then validate this fold again (--validate-only)",
                    configuration,
                    case_id,
                    identifier,
                    stage.name,
                )
                continue
            labels = spec.consecutive_labels(read_label(validation / f"{case_id}.nii.gz")[0])
            on_grid = PreprocessingRecord.from_json(read_json(record)).labels_to_grid(labels, stage.resampling)
            buffer = io.BytesIO()
            np.save(buffer, on_grid)
            atomic_write_bytes(folder / f"{case_id}.npy", buffer.getvalue())
        log.info("wrote %d masks for %s to %s", len(case_ids), stage.name, folder)


def training_subset(case_ids: Sequence[str]) -> list[str]:
    """The validation cases scored during training: all of them, or a fixed seeded subset of a large fold."""
    ids = sorted(case_ids)
    if len(ids) <= MAX_TRAINING_VALIDATION_CASES:
        return ids
    return sorted(random.Random(SUBSET_SEED).sample(ids, MAX_TRAINING_VALIDATION_CASES))


class RealValidation:
    """The real Dice of weights during training (:class:`autoseg.training.real_validation.Validation`):
    the cases predicted in full by ``predictor_for(weights)``, scored, nothing written.

    ``tiles`` is the number of sliding-window tiles over all cases (their cost in forward passes).
    """

    def __init__(
        self, predictor_for: Callable[[dict], Predictor], cases: list[CaseFiles], spec: DatasetSpec, tiles: int
    ) -> None:
        self.predictor_for, self.cases, self.spec, self.forward_passes = predictor_for, cases, spec, tiles

    def __call__(self, weights: dict) -> dict[str, float]:
        predictor = self.predictor_for(weights)
        return mean_scores({c.case_id: score_case(predictor, c, self.spec, None) for c in self.cases})


def window_tiles(shape: Sequence[int], patch: Sequence[int], step: float) -> int:
    """Sliding-window tiles over one preprocessed case (a 2D patch slides over every slice of a volume)."""
    from autoseg.inference.sliding_window import tile_starts

    slices = math.prod(shape[: len(shape) - len(patch)])
    inner = [max(s, p) for s, p in zip(shape[len(shape) - len(patch) :], patch)]
    return slices * math.prod(len(starts) for starts in tile_starts(inner, patch, step))
