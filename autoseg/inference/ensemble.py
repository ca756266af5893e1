"""Predict with what ``autoseg select`` chose: one configuration or an ensemble of several.

Configurations preprocess to different grids, so an ensemble averages its members'
probabilities on the input grid, then paints labels with the same code as a single
predictor. Which models to use follows one precedence: ``-c``/``--folds``/``--checkpoint``
given > ``inference.json`` > the default (3d_fullres, every trained fold, final checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.errors import WorkspaceError
from autoseg.inference.export import paint_labels, probabilities_on_input_grid
from autoseg.inference.instructions import read_instructions
from autoseg.inference.predictor import Predictor
from autoseg.io.geometry import Geometry
from autoseg.postprocessing import Step
from autoseg.workspace import find_dataset

log = logging.getLogger(__name__)
DEFAULT_CONFIGURATION = "3d_fullres"


class EnsemblePredictor(Predictor):
    """Several configurations' predictors whose probabilities are averaged on the input grid.

    It reuses :class:`Predictor`'s file handling (``predict_case``, ``predict_folder``); only
    the step from image to probabilities differs, since there is no common preprocessed grid.
    """

    def __init__(self, members: Sequence[Predictor], postprocessing: Sequence[Step] = ()) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two predictors")
        self.members = list(members)
        self.plan = members[0].plan
        self.postprocessing = tuple(postprocessing)

    def predictors(self) -> list[Predictor]:
        return self.members

    def probabilities(self, data: np.ndarray, geometry: Geometry):
        raise TypeError("an ensemble of configurations has no common preprocessed grid; "
                        "use predict_with_probabilities (input grid)")

    def average_probabilities(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """float32 ``(K, z, y, x)`` mean of the members' probabilities on the input grid."""
        total = None
        for member in self.members:
            probabilities, properties = member.probabilities(np.array(data, dtype=np.float32), geometry)
            on_grid = probabilities_on_input_grid(probabilities, properties, member.plan, member.config.resampling)
            total = on_grid.astype(np.float32) if total is None else np.add(total, on_grid, out=total)
        return total / len(self.members)

    def labels_and_probabilities(self, data: np.ndarray, geometry: Geometry,
                                 with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        self._check_input(data)
        average = self.average_probabilities(data, geometry)
        labels = self._postprocess(paint_labels(average, average.shape[1:], self.plan.regions), geometry)
        return labels, (average.astype(np.float16) if with_probabilities else None)


def load_predictor(workdir: Path, dataset: str | None = None, configurations: Sequence[str] | None = None,
                   folds: Sequence[int | str] | None = None, checkpoint: str | None = None,
                   **kwargs) -> Predictor:
    """The predictor ``autoseg predict`` uses; ``kwargs`` (device, tta, step) go to every member.

    ``inference.json`` is followed as a whole (models and post-processing) when present and
    none of ``configurations``, ``folds``, ``checkpoint`` is given; otherwise those options
    (or the defaults) decide and no post-processing is applied.
    """
    workspace = find_dataset(workdir, dataset)
    explicit = configurations or folds is not None or checkpoint is not None
    if workspace.inference.is_file() and not explicit:
        chosen = read_instructions(workspace.inference)
        log.info("following %s: %s, post-processing: %s", workspace.inference.name,
                 " + ".join(chosen.configurations), len(chosen.postprocessing) or "none")
        members = [Predictor.from_workdir(workdir, workspace.name, c, list(chosen.folds[c]), chosen.checkpoint,
                                          **kwargs) for c in chosen.configurations]
        steps = chosen.postprocessing
    else:
        if workspace.inference.is_file():
            log.info("not following %s: models chosen on the command line", workspace.inference.name)
        members = [Predictor.from_workdir(workdir, workspace.name, c, folds, checkpoint or "final", **kwargs)
                   for c in (configurations or [DEFAULT_CONFIGURATION])]
        steps = ()
    if len({m.config.name for m in members}) != len(members):
        raise WorkspaceError(f"configuration(s) listed twice: {', '.join(m.config.name for m in members)}")
    if len(members) == 1:
        members[0].postprocessing = tuple(steps)
        return members[0]
    return EnsemblePredictor(members, steps)
