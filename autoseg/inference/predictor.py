"""``autoseg predict`` and the Python API: load the folds once, predict arrays or files.

Per case: the training preprocessing (same function) -> sliding window with mirror TTA
for every fold -> average of the folds' probabilities -> back to the input grid class by
class -> labels in the dataset's own convention, written with the input's geometry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoseg.devices import resolve_device
from autoseg.errors import AutosegError, CheckpointError, DatasetError, WorkspaceError
from autoseg.inference.export import (probabilities_on_input_grid, probabilities_to_labels, to_output_values,
                                      write_probabilities)
from autoseg.inference.inputs import find_cases
from autoseg.inference.sliding_window import as_tensor, logits_to_probabilities, predict_logits
from autoseg.io.datasets import CaseFiles
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_channels, write_label
from autoseg.network import build_network
from autoseg.planning.plan import Plan, load_plan
from autoseg.postprocessing import Step, apply_steps
from autoseg.preprocessing import preprocess_case
from autoseg.progress import progress_bar
from autoseg.training.checkpoint import load_checkpoint
from autoseg.workspace import find_dataset

log = logging.getLogger(__name__)
DEFAULT_STEP = 0.5


@dataclass
class PredictionReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Predictor:
    """A trained configuration's folds, loaded once.

    >>> predictor = Predictor.from_workdir(Path("autoseg_work"), folds=[0, 1])
    >>> labels = predictor.predict_array(image, geometry)   # (C, z, y, x) float32 in, (z, y, x) out
    """

    def __init__(self, plan: Plan, configuration: str, weights: Sequence[dict], device: str = "auto",
                 tta: bool = True, step: float = DEFAULT_STEP, postprocessing: Sequence[Step] = ()) -> None:
        if not weights:
            raise CheckpointError("no fold to predict with")
        self.plan = plan
        self.postprocessing = tuple(postprocessing)
        self.config = plan.configuration(configuration)
        self.device = resolve_device(device)
        self.tta = tta
        self.step = step
        self.networks = []
        for state in weights:
            network = build_network(self.config, len(plan.channel_names), plan.num_classes, deep_supervision=False)
            network.load_state_dict(state)
            self.networks.append(network.to(self.device).eval())

    @classmethod
    def from_workdir(cls, workdir: Path, dataset: str | None = None, configuration: str = "3d_fullres",
                     folds: Sequence[int | str] | None = None, checkpoint: str = "final", **kwargs) -> "Predictor":
        workspace = find_dataset(workdir, dataset)
        plan = load_plan(workspace.plans)
        plan.configuration(configuration)
        root = workspace.root / "models" / configuration
        if folds is None:
            folds = sorted(p.name.removeprefix("fold_") for p in root.glob("fold_*")  # not fold_all: it saw every case
                           if p.name != "fold_all" and (p / f"checkpoint_{checkpoint}.pt").is_file())
            if not folds:
                raise WorkspaceError(f"no trained fold of {configuration} in {root}; run `autoseg train` first")
        weights = []
        for fold in folds:
            path = root / f"fold_{fold}" / f"checkpoint_{checkpoint}.pt"
            if not path.is_file():
                raise WorkspaceError(f"fold {fold} has no {path.name} in {path.parent}")
            weights.append(load_checkpoint(path)["weights"])
        log.info("predicting with %s, folds %s (%s checkpoints)", configuration, ", ".join(map(str, folds)), checkpoint)
        return cls(plan, configuration, weights, **kwargs)

    @torch.inference_mode()
    def probabilities(self, data: np.ndarray, geometry: Geometry) -> tuple[torch.Tensor, dict]:
        """Fold-averaged probabilities on the preprocessed grid, and the preprocessing record."""
        pre = preprocess_case(data, geometry, self.plan, self.config)
        image = as_tensor(pre.data)
        mirror = tuple(range(self.config.dims)) if self.tta else ()
        total = None
        for network in self.networks:
            logits = predict_logits(network, image, self.config.patch_size, self.plan.num_classes, self.step,
                                    mirror, self.device)
            probabilities = logits_to_probabilities(logits, bool(self.plan.regions))
            total = probabilities if total is None else total.add_(probabilities)
        return total.div_(len(self.networks)), pre.properties

    def predict_with_probabilities(self, data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """(labels in the dataset's values, float16 ``(K, z, y, x)`` probabilities), both on the input grid."""
        self._check_channels(data)
        probabilities, properties = self.probabilities(np.array(data, dtype=np.float32), geometry)
        labels = self._postprocess(probabilities_to_labels(probabilities, properties, self.plan,
                                                           self.config.resampling), geometry)
        on_grid = probabilities_on_input_grid(probabilities, properties, self.plan, self.config.resampling)
        return to_output_values(labels, self.plan), on_grid

    def _check_channels(self, data: np.ndarray) -> None:
        if data.shape[0] != len(self.plan.channel_names):
            raise DatasetError(f"image has {data.shape[0]} channel(s); the model expects "
                               f"{len(self.plan.channel_names)} ({', '.join(self.plan.channel_names)})")

    def predict_labels(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Consecutive training labels ``(z, y, x)`` on the input grid for a ``(C, z, y, x)`` image."""
        self._check_channels(data)
        probabilities, properties = self.probabilities(np.array(data, dtype=np.float32), geometry)
        return self._postprocess(probabilities_to_labels(probabilities, properties, self.plan,
                                                         self.config.resampling), geometry)

    def _postprocess(self, labels: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The one place post-processing (chosen by ``autoseg select``; none by default) is applied."""
        return apply_steps(labels, self.postprocessing, geometry.spacing)

    def predict_array(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Labels ``(z, y, x)`` in the dataset's own values (e.g. BraTS 1/2/4) for a ``(C, z, y, x)`` image."""
        return to_output_values(self.predict_labels(data, geometry), self.plan)

    def predict_case(self, case: CaseFiles, output: Path, save_probabilities: bool = False) -> None:
        """Write the mask (and ``<case>.npz`` with float16 ``probabilities`` if asked) for one case."""
        data, geometry = read_channels(case.images)
        try:
            self._check_channels(data)
        except DatasetError as exc:
            raise DatasetError(f"case {case.case_id}: {exc}") from None
        if not save_probabilities:
            write_label(self.predict_array(data, geometry), geometry, output)
            return
        labels, probabilities = self.predict_with_probabilities(data, geometry)
        write_probabilities(output.with_name(output.name.removesuffix(".nii.gz") + ".npz"), probabilities, self.plan)
        write_label(labels, geometry, output)

    def predict_folder(self, source: Path, output: Path, overwrite: bool = False, save_probabilities: bool = False,
                       show_progress: bool = True) -> PredictionReport:
        """Predict every case under ``source`` into ``output/<case>.nii.gz``; a failing case does not stop the rest."""
        cases = find_cases(source)
        output.mkdir(parents=True, exist_ok=True)
        report = PredictionReport()
        with progress_bar("Predicting", len(cases), show_progress) as advance:
            for case in cases:
                target = output / f"{case.case_id}.nii.gz"
                if target.exists() and not overwrite:
                    report.skipped.append(case.case_id)
                else:
                    try:
                        self.predict_case(case, target, save_probabilities)
                        report.written.append(case.case_id)
                    except (AutosegError, OSError, ValueError, RuntimeError) as exc:
                        report.failed[case.case_id] = str(exc).splitlines()[0]
                        log.error("case %s failed: %s", case.case_id, report.failed[case.case_id])
                advance(case.case_id)
        return report
