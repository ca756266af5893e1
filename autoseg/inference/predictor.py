"""``autoseg predict`` and the Python API: load the folds once, predict arrays or files.

Per case: the training preprocessing (same function) -> sliding window with mirror TTA
for every fold into one logit accumulator -> probabilities -> back to the input grid class
by class -> labels in the dataset's own convention, written with the input's geometry.
Memory stays bounded: mirrored copies go through the network in batches sized from a
budget, and the accumulator turns float16 for very large volumes (see sliding_window).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from autoseg.devices import inference_autocast, resolve_device
from autoseg.errors import AutosegError, CheckpointError, DatasetError, WorkspaceError
from autoseg.inference.backends import TileModel, backend_model, onnx_model, resolve_backend
from autoseg.inference.export import (labels_and_probabilities_on_input_grid, probabilities_to_labels,
                                      to_output_values, write_probabilities)
from autoseg.inference.inputs import find_cases
from autoseg.inference.sliding_window import WindowSettings, as_tensor, predict_probabilities
from autoseg.io.datasets import CaseFiles
from autoseg.io.geometry import Geometry
from autoseg.io.images import (ITK_SUFFIXES, describe_nonfinite, read_channels, replace_nonfinite,
                               write_label)
from autoseg.jsonio import ensure_writable_folder
from autoseg.network import build_network
from autoseg.planning.plan import Configuration, Plan, load_plan
from autoseg.postprocessing import Step, apply_steps
from autoseg.preprocessing import preprocess_case
from autoseg.progress import progress_bar
from autoseg.training.checkpoint import load_checkpoint, load_weights
from autoseg.workspace import find_dataset

log = logging.getLogger(__name__)
DEFAULT_STEP = 0.5
CPU_ACTIVATION_BUDGET = 1024**3
ACTIVATION_BYTES_PER_INPUT_VOXEL_AND_FEATURE = 20  # measured: Task01 network, one 128^3 sample, 1.3 GB


def mirror_batch_limit(config: Configuration, device: torch.device) -> int:
    """How many mirrored copies of a tile share one forward pass.

    On CUDA all 8 (an out-of-memory error halves it). On a CPU batching buys little speed
    and a Task01-size copy already needs ~1.3 GB of activations, so the batch is what fits
    in ``CPU_ACTIVATION_BUDGET``, at least 1.
    """
    if device.type == "cuda":
        return 8
    per_copy = ACTIVATION_BYTES_PER_INPUT_VOXEL_AND_FEATURE * config.network.features_per_stage[0] * math.prod(
        config.patch_size)
    return int(max(1, min(8, CPU_ACTIVATION_BUDGET // per_copy)))


def _check_output_folder(source: Path, output: Path) -> None:
    """The masks go to a folder of their own: not a file name, not the input folder (they would become input)."""
    if output.name.lower().endswith(ITK_SUFFIXES):
        raise WorkspaceError(f"-o {output} looks like a file; give the folder the masks go to "
                             "(each is named after its case)")
    if source.is_dir() and output.exists() and output.resolve() == source.resolve():
        raise WorkspaceError(f"-o {output} is the input folder; give another folder, or the masks would be read "
                             "as new cases next time")


@dataclass
class PredictionReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    #: case -> what ``nan_to_num`` replaced in its image (the case is also in ``written``).
    repaired: dict[str, str] = field(default_factory=dict)


class Predictor:
    """A trained configuration's folds, loaded once.

    >>> predictor = Predictor.from_workdir(Path("autoseg_work"), folds=[0, 1])
    >>> labels = predictor.predict_array(image, geometry)   # (C, z, y, x) float32 in, (z, y, x) out
    """

    def __init__(self, plan: Plan, configuration: str, weights: Sequence[dict], device: str = "auto",
                 tta: bool = True, step: float = DEFAULT_STEP, precision: str = "auto",
                 postprocessing: Sequence[Step] = (), backend: str = "torch",
                 onnx_files: Sequence[Path | None] = ()) -> None:
        """``backend``: see :mod:`autoseg.inference.backends`; ``onnx_files``: per fold the ONNX model
        `autoseg export` wrote (``None`` or missing: exported from ``weights`` when the backend needs one)."""
        if not weights:
            raise CheckpointError("no fold to predict with")
        self.plan = plan
        self.postprocessing = tuple(postprocessing)
        self.on_tile: Callable[[int, int], None] | None = None  # set by predict_folder for its progress bar
        self.config = plan.configuration(configuration)
        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device, precision)
        self.tta = tta
        self.step = step
        self.window = WindowSettings(
            patch=tuple(self.config.patch_size), step=step,
            mirror_axes=tuple(range(self.config.dims)) if tta else (),
            autocast_dtype=inference_autocast(self.device, precision) if self.backend == "torch" else None,
            max_batch=mirror_batch_limit(self.config, self.device))
        # channels-last helps cuDNN's mixed-precision kernels; on CPUs it measured slower (docs/performance.md)
        memory_format = (torch.channels_last_3d if self.config.dims == 3 else torch.channels_last
                         ) if self.device.type == "cuda" else torch.contiguous_format
        self.networks: list[TileModel] = []
        for index, state in enumerate(weights):
            if self.backend != "torch":
                stored = onnx_files[index].read_bytes() if index < len(onnx_files) and onnx_files[index] else None
                model = onnx_model(state, self.config, len(plan.channel_names), plan.num_classes, stored,
                                   f"model {index + 1} of {len(weights)} ({configuration})")
                self.networks.append(backend_model(self.backend, model, self.device))
                continue
            network = build_network(self.config, len(plan.channel_names), plan.num_classes, deep_supervision=False)
            load_weights(network, state, f"model {index + 1} of {len(weights)} ({configuration})")
            self.networks.append(network.to(self.device, memory_format=memory_format).eval())

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
        repeated = sorted({str(f) for f in folds if [str(g) for g in folds].count(str(f)) > 1})
        if repeated:
            raise WorkspaceError(f"fold(s) {', '.join(repeated)} listed more than once")
        weights, onnx_files = [], []
        for fold in folds:
            path = root / f"fold_{fold}" / f"checkpoint_{checkpoint}.pt"
            if not path.is_file():
                raise WorkspaceError(f"fold {fold} has no {path.name} in {path.parent}")
            weights.append(load_checkpoint(path)["weights"])
            exported = path.with_suffix(".onnx")  # written by `autoseg export`
            onnx_files.append(exported if exported.is_file() else None)
        log.info("predicting with %s, folds %s (%s checkpoints)", configuration, ", ".join(map(str, folds)), checkpoint)
        return cls(plan, configuration, weights, onnx_files=onnx_files, **kwargs)

    @torch.inference_mode()
    def probabilities(self, data: np.ndarray, geometry: Geometry) -> tuple[torch.Tensor, dict]:
        """Probabilities (the mean of every fold's and mirror's softmax) on the preprocessed grid, and the
        preprocessing record.

        ``data`` may be normalised in place: pass a copy if you still need it.
        """
        self._check_input(data)
        pre = preprocess_case(data, geometry, self.plan, self.config)
        image, properties = as_tensor(pre.data), pre.properties
        del pre  # the tensor shares the array's memory; nothing else keeps a second copy alive
        return predict_probabilities(self.networks, image, self.plan.num_classes, self.window, bool(self.plan.regions),
                                     self.device, self.on_tile), properties

    def labels_and_probabilities(self, data: np.ndarray, geometry: Geometry,
                                 with_probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Consecutive labels (post-processed) and, if asked, float16 probabilities, both on the input grid.

        ``data`` may be normalised in place: pass a copy if you still need it.
        """
        probabilities, properties = self.probabilities(data, geometry)
        resampling = self.config.resampling
        if with_probabilities:
            labels, on_grid = labels_and_probabilities_on_input_grid(probabilities, properties, self.plan, resampling)
        else:
            labels, on_grid = probabilities_to_labels(probabilities, properties, self.plan, resampling), None
        return self._postprocess(labels, geometry), on_grid

    def predict_with_probabilities(self, data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """(labels in the dataset's values, float16 ``(K, z, y, x)`` probabilities), both on the input grid."""
        labels, probabilities = self.labels_and_probabilities(np.array(data, dtype=np.float32), geometry, True)
        return to_output_values(labels, self.plan), probabilities

    def _check_input(self, data: np.ndarray) -> None:
        """Refuse an image the network would turn into a wrong mask: wrong channel count, NaN or Inf."""
        if data.shape[0] != len(self.plan.channel_names):
            raise DatasetError(f"image has {data.shape[0]} channel(s); the model expects "
                               f"{len(self.plan.channel_names)} ({', '.join(self.plan.channel_names)})")
        nonfinite = describe_nonfinite(data)
        if nonfinite:
            raise DatasetError(f"image has {nonfinite}; fix the scan, or predict with --nan-to-num to replace them")

    def predict_labels(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Consecutive training labels ``(z, y, x)`` on the input grid for a ``(C, z, y, x)`` image."""
        return self.labels_and_probabilities(np.array(data, dtype=np.float32), geometry, False)[0]

    def _postprocess(self, labels: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The one place post-processing (chosen by ``autoseg select``; none by default) is applied."""
        return apply_steps(labels, self.postprocessing, geometry.spacing)

    def predict_array(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Labels ``(z, y, x)`` in the dataset's own values (e.g. BraTS 1/2/4) for a ``(C, z, y, x)`` image."""
        return to_output_values(self.predict_labels(data, geometry), self.plan)

    def predict_case(self, case: CaseFiles, output: Path, save_probabilities: bool = False,
                     nan_to_num: bool = False) -> str | None:
        """Write the mask (and ``<case>.npz`` with float16 ``probabilities`` if asked) for one case.

        NaN/Inf voxels refuse the case unless ``nan_to_num`` replaces them (see
        :func:`replace_nonfinite`); what was replaced is returned for the report.
        The image read from disk is handed over, not copied: peak memory is one copy of the case.
        """
        data, geometry = read_channels(case.images)
        repaired = replace_nonfinite(data) if nan_to_num else None
        labels, probabilities = self.labels_and_probabilities(data, geometry, save_probabilities)
        if probabilities is not None:
            write_probabilities(output.with_name(output.name.removesuffix(".nii.gz") + ".npz"), probabilities,
                                self.plan)
            del probabilities
        write_label(to_output_values(labels, self.plan), geometry, output)
        return repaired

    def predict_folder(self, source: Path, output: Path, overwrite: bool = False, save_probabilities: bool = False,
                       show_progress: bool = True, nan_to_num: bool = False) -> PredictionReport:
        """Predict every case under ``source`` into ``output/<case>.nii.gz``; a failing case does not stop the rest.

        A case with NaN/Inf voxels fails by name, unless ``nan_to_num`` replaces them; the
        replacement is then logged and listed in ``report.repaired``.
        """
        _check_output_folder(Path(source), Path(output))
        cases = find_cases(source, self.plan.channel_names)
        ensure_writable_folder(output)  # before the first case: no network run in vain
        report = PredictionReport()
        with progress_bar("Predicting", len(cases), show_progress) as advance:
            for case in cases:
                target = output / f"{case.case_id}.nii.gz"
                if target.exists() and not overwrite:
                    report.skipped.append(case.case_id)
                else:
                    for stale in output.glob(f".{case.case_id}.*"):  # temporary files of a killed run
                        stale.unlink(missing_ok=True)
                    for predictor in self.predictors():
                        predictor.on_tile = lambda done, total, name=case.case_id: advance(
                            f"{name}: tile {done}/{total}", step=0)
                    try:
                        repaired = self.predict_case(case, target, save_probabilities, nan_to_num)
                        report.written.append(case.case_id)
                        if repaired:
                            report.repaired[case.case_id] = repaired
                            log.warning("case %s: %s", case.case_id, repaired)
                    except Exception as exc:  # reported by name; the other cases still run
                        known = isinstance(exc, (AutosegError, OSError, ValueError))
                        reason = str(exc).splitlines()[0] if str(exc) else ""
                        report.failed[case.case_id] = reason if known else f"{type(exc).__name__}: {reason}"
                        log.error("case %s failed: %s", case.case_id, report.failed[case.case_id])
                advance(case.case_id)
        for predictor in self.predictors():
            predictor.on_tile = None
        return report

    def predictors(self) -> list["Predictor"]:
        """The single-configuration predictors doing the work (an ensemble has several)."""
        return [self]
