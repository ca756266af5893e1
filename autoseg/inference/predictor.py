"""The predictor: fold ensembles of one or more configurations, averaged, then labels.

A :class:`Predictor` is composed, not configured: its members are
:class:`~autoseg.inference.fold_ensemble.FoldEnsemble` objects (one per configuration), plus
the post-processing steps and the calibration temperature ``autoseg select`` chose. One
configuration goes from its preprocessed grid to the input grid class by class (two
full-size arrays in memory, not one per class); several are averaged on the input grid,
since they preprocess to different grids. Labels come from the same painting code either way.

>>> predictor = Predictor.from_workdir(Path("autoseg_work"), folds=[0, 1])
>>> labels = predictor.predict_array(image, geometry)   # (C, z, y, x) float32 in, (z, y, x) out
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from autoseg.core.checkpoint import load_inference_weights
from autoseg.core.devices import resolve_device
from autoseg.core.errors import DatasetError, WorkspaceError
from autoseg.core.geometry import Geometry, voxel_volume_ml
from autoseg.core.plan import Plan, load_plan
from autoseg.core.workspace import DatasetWorkspace, find_dataset
from autoseg.data.evaluation.postprocessing import Step, apply_steps
from autoseg.data.io.datasets import CaseFiles
from autoseg.data.io.images import describe_nonfinite, read_channels, replace_nonfinite, write_array, write_label
from autoseg.data.preprocessing.fingerprint import body_quantiles
from autoseg.data.preprocessing.restore import (
    labels_and_probabilities_on_input_grid,
    paint_labels,
    probabilities_on_input_grid,
    probabilities_to_labels,
    to_output_values,
    write_probabilities,
)
from autoseg.data.qc.calibration import apply_temperature
from autoseg.data.qc.flags import TrainingReference, assess_case, structure_statistics, structure_volumes
from autoseg.data.qc.uncertainty import disagreement_map, entropy_map, structure_confidence, structures_of
from autoseg.inference.backends import int8_path, resolve_backend
from autoseg.inference.fold_ensemble import FoldEnsemble, OnTile
from autoseg.inference.sliding_window import PassCount

log = logging.getLogger(__name__)


class MaskWriter(Protocol):
    """Writes a case's mask in another format beside the NIfTI (``predict --output-type dicom-seg``)."""

    def write(self, mask: np.ndarray, series: Path, path: Path) -> None: ...


@dataclass
class Uncertainty:
    """What :meth:`Predictor.labels_and_uncertainty` measures (see :mod:`autoseg.data.qc.uncertainty`)."""

    probabilities: np.ndarray  # float16 (K, z, y, x), calibrated
    entropy: np.ndarray  # float32 (z, y, x) in [0, 1]
    disagreement: np.ndarray  # float32 (z, y, x) in [0, 1]
    structures: dict[str, dict]


class Predictor:
    """Members (one :class:`FoldEnsemble` per configuration) averaged, post-processed and tempered."""

    def __init__(
        self, members: Sequence[FoldEnsemble], postprocessing: Sequence[Step] = (), temperature: float = 1.0
    ) -> None:
        if not members:
            raise WorkspaceError("no model to predict with")
        self.members = list(members)
        self.plan = members[0].plan
        self.postprocessing = tuple(postprocessing)
        self.temperature = float(temperature)

    @classmethod
    def from_weights(
        cls, plan: Plan, configuration: str, weights: Sequence[dict], postprocessing: Sequence[Step] = (), **kwargs
    ) -> Predictor:
        """One configuration's folds from their state dicts; ``kwargs`` go to :class:`FoldEnsemble`."""
        return cls([FoldEnsemble(plan, configuration, weights, **kwargs)], postprocessing)

    @classmethod
    def from_workdir(
        cls,
        workdir: Path,
        dataset: str | None = None,
        configuration: str = "3d_fullres",
        folds: Sequence[int | str] | None = None,
        checkpoint: str = "final",
        **kwargs,
    ) -> Predictor:
        """One configuration's trained folds (default: every cross-validation fold) from a work folder."""
        workspace = find_dataset(workdir, dataset)
        plan = load_plan(workspace.plans)
        plan.configuration(configuration)
        return cls([load_fold_ensemble(workspace, plan, configuration, folds, checkpoint, **kwargs)])

    @property
    def tta(self) -> bool:
        return self.members[0].tta

    def settings(self) -> dict:
        """How the networks run (the same for every member): backend, precision, step, mirror axes,
        adaptive TTA's threshold (None: every tile mirrored) and whether torch ran them compiled."""
        member, window = self.members[0], self.members[0].window
        precision = (
            "int8"
            if member.int8
            else "bf16"
            if member.bf16  # bf16: torch's autocast or OpenVINO's
            else {None: "fp32", torch.float16: "fp16"}[window.autocast_dtype]
        )
        return {
            "backend": member.backend,
            "precision": precision,
            "step": window.step,
            "mirror_axes": list(window.mirror_axes),
            "adaptive_tta": window.adaptive,
            "compiled": member.torch_compile,
        }

    def passes(self) -> PassCount:
        """Network passes run and skipped by every member since loading."""
        return sum((m.passes for m in self.members), PassCount())

    def labels_and_probabilities(
        self, data: np.ndarray, geometry: Geometry, with_probabilities: bool, on_tile: OnTile | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Consecutive labels (post-processed) and, if asked, float16 probabilities (tempered), both on
        the input grid. ``data`` may be normalised in place: pass a copy if you still need it."""
        self._check_input(data)
        if len(self.members) == 1:
            member = self.members[0]
            probabilities, record = member.probabilities(data, geometry, on_tile)
            resampling = member.config.resampling
            if with_probabilities:
                labels, on_grid = labels_and_probabilities_on_input_grid(probabilities, record, self.plan, resampling)
            else:
                labels, on_grid = probabilities_to_labels(probabilities, record, self.plan, resampling), None
        else:
            average = self._average_on_input_grid(data, geometry, on_tile)
            labels = paint_labels(average, average.shape[1:], self.plan.regions)
            on_grid = average if with_probabilities else None
        labels = apply_steps(labels, self.postprocessing, geometry.spacing)
        if on_grid is not None and self.temperature != 1.0:
            on_grid = apply_temperature(on_grid, self.temperature, bool(self.plan.regions))
        return labels, (on_grid.astype(np.float16, copy=False) if on_grid is not None else None)

    def labels_and_uncertainty(
        self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None = None
    ) -> tuple[np.ndarray, Uncertainty]:
        """Labels (post-processed) and the uncertainty of the prediction, on the input grid.

        Every fold runs on its own (the same work as averaging them in the sliding window) so that their
        disagreement can be measured. The labels and the mean whose entropy is measured are made from the folds'
        mean exactly as :meth:`labels_and_probabilities` makes them (an imported model's folds averaged as logits),
        so asking for the uncertainty does not change the mask (but with adaptive TTA, where each fold decides its
        own mirrors here); the entropy is that of the calibrated mean.
        """
        self._check_input(data)
        regions = bool(self.plan.regions)
        folds, means = [], []  # every fold's probabilities on the input grid; per member its folds' mean
        for member in self.members:
            outputs, record = member.fold_outputs(np.array(data, dtype=np.float32), geometry, on_tile)
            resampling = member.config.resampling
            folds += [
                probabilities_on_input_grid(member.as_probabilities(o), record, self.plan, resampling) for o in outputs
            ]
            mean_output = torch.stack([o.float() for o in outputs]).mean(0) if len(outputs) > 1 else outputs[0]
            means.append((member.as_probabilities(mean_output), record, resampling))
        if len(means) == 1:
            labels, mean = labels_and_probabilities_on_input_grid(*means[0][:2], self.plan, means[0][2])
            mean = mean.astype(np.float32)
        else:
            mean = np.mean(
                [probabilities_on_input_grid(p, r, self.plan, rs).astype(np.float32) for p, r, rs in means], axis=0
            )
            labels = paint_labels(mean, mean.shape[1:], self.plan.regions)
        labels = apply_steps(labels, self.postprocessing, geometry.spacing)
        if self.temperature != 1.0:
            mean = apply_temperature(mean, self.temperature, regions)
        entropy = entropy_map(mean, regions)
        disagreement = disagreement_map(folds, regions)
        voxel_ml = voxel_volume_ml(geometry.spacing)
        structures = structure_confidence(mean, labels, entropy, disagreement, structures_of(self.plan), voxel_ml)
        return labels, Uncertainty(mean.astype(np.float16), entropy, disagreement, structures)

    def _average_on_input_grid(self, data: np.ndarray, geometry: Geometry, on_tile: OnTile | None) -> np.ndarray:
        total = None
        for member in self.members:
            on_grid = member.probabilities_on_input_grid(np.array(data, dtype=np.float32), geometry, on_tile)
            total = on_grid.astype(np.float32) if total is None else np.add(total, on_grid, out=total)
        return total / len(self.members)

    def _check_input(self, data: np.ndarray) -> None:
        """Refuse an image the network would turn into a wrong mask: wrong channel count, NaN or Inf."""
        if data.shape[0] != len(self.plan.channel_names):
            raise DatasetError(
                f"image has {data.shape[0]} channel(s); the model expects "
                f"{len(self.plan.channel_names)} ({', '.join(self.plan.channel_names)})"
            )
        nonfinite = describe_nonfinite(data)
        if nonfinite:
            raise DatasetError(f"image has {nonfinite}; fix the scan, or predict with --nan-to-num to replace them")

    def predict_labels(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Consecutive training labels ``(z, y, x)`` on the input grid for a ``(C, z, y, x)`` image."""
        return self.labels_and_probabilities(np.array(data, dtype=np.float32), geometry, False)[0]

    def predict_array(self, data: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Labels ``(z, y, x)`` in the dataset's own values (e.g. BraTS 1/2/4) for a ``(C, z, y, x)`` image."""
        return to_output_values(self.predict_labels(data, geometry), self.plan)

    def predict_with_probabilities(self, data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """(labels in the dataset's values, float16 ``(K, z, y, x)`` probabilities), both on the input grid."""
        labels, probabilities = self.labels_and_probabilities(np.array(data, dtype=np.float32), geometry, True)
        return to_output_values(labels, self.plan), probabilities

    def predict_case(
        self,
        case: CaseFiles,
        folder: Path,
        *,
        save_probabilities: bool = False,
        nan_to_num: bool = False,
        on_tile: OnTile | None = None,
        nifti: bool = True,
        dicom_seg: MaskWriter | None = None,
        uncertainty: bool = False,
        statistics: bool = False,
        reference: TrainingReference | None = None,
    ) -> dict:
        """Write the case's mask into ``folder``: ``<case>.nii.gz`` (``nifti``), ``<case>.dcm`` (with a
        ``dicom_seg`` writer), ``<case>.npz`` with float16 ``probabilities`` if asked, and with
        ``uncertainty`` ``<case>_entropy.nii.gz`` and ``<case>_disagreement.nii.gz`` (float32: NIfTI
        has no float16). Returns the case's report entry (:func:`autoseg.data.qc.flags.assess_case`: flags
        against the training ``reference``, input geometry, intensities, volumes), with ``repaired``
        (what ``nan_to_num`` replaced), ``structures`` (per structure volume, entropy, disagreement and
        estimated Dice, with ``uncertainty``) and ``statistics`` (with ``statistics``).

        NaN/Inf voxels refuse the case unless ``nan_to_num`` replaces them (see :func:`replace_nonfinite`).
        The image read from disk is handed over, not copied: peak memory is one copy of the case (two
        with ``statistics``, which needs the raw intensities after the network has run).
        """
        data, geometry = read_channels(case.images)
        passes_before = self.passes()
        entry: dict = {"repaired": replace_nonfinite(data)} if nan_to_num else {}
        quantiles = body_quantiles(data, case.case_id)  # before the network normalises ``data`` in place
        raw = data.copy() if statistics else None
        labels = self._labels_into(
            folder / case.case_id, data, geometry, entry, save_probabilities, uncertainty, on_tile
        )
        structures, voxel_ml = structures_of(self.plan), voxel_volume_ml(geometry.spacing)
        entry = (
            assess_case(
                geometry,
                quantiles,
                self.plan.channel_names,
                structure_volumes(labels, structures, voxel_ml),
                entry.get("structures"),
                reference,
            )
            | entry
        )
        if raw is not None:
            entry["statistics"] = structure_statistics(labels, raw, self.plan.channel_names, structures, voxel_ml)
            del raw
        entry["passes"] = asdict(_log_passes(case.case_id, self.passes() - passes_before))
        mask = to_output_values(labels, self.plan)
        if nifti:
            write_label(mask, geometry, folder / f"{case.case_id}.nii.gz")
        if dicom_seg is not None:
            dicom_seg.write(mask, case.images[0], folder / f"{case.case_id}.dcm")
        return {k: v for k, v in entry.items() if v is not None}

    def _labels_into(
        self,
        stem: Path,
        data: np.ndarray,
        geometry: Geometry,
        entry: dict,
        save_probabilities: bool,
        uncertainty: bool,
        on_tile: OnTile | None,
    ) -> np.ndarray:
        """The case's labels; writes ``<stem>.npz`` (probabilities, if asked) and with ``uncertainty`` its
        entropy and disagreement maps, whose per-structure summary goes to ``entry["structures"]``."""
        if uncertainty:
            labels, measured = self.labels_and_uncertainty(data, geometry, on_tile)
            probabilities = measured.probabilities if save_probabilities else None
            for name, volume in (("entropy", measured.entropy), ("disagreement", measured.disagreement)):
                write_array(volume.astype(np.float32), geometry, stem.with_name(f"{stem.name}_{name}.nii.gz"))
            entry["structures"] = measured.structures
            del measured
        else:
            labels, probabilities = self.labels_and_probabilities(data, geometry, save_probabilities, on_tile)
        if probabilities is not None:
            write_probabilities(stem.with_name(f"{stem.name}.npz"), probabilities, self.plan)
        return labels


def _log_passes(case_id: str, passes: PassCount) -> PassCount:
    if passes.skipped:
        log.info(
            "case %s: %d network passes run, %d mirrored passes skipped (adaptive TTA mirrored %d of %d tiles)",
            case_id,
            passes.run,
            passes.skipped,
            passes.mirrored_tiles,
            passes.tiles,
        )
    return passes


def load_fold_ensemble(
    workspace: DatasetWorkspace,
    plan: Plan,
    configuration: str,
    folds: Sequence[int | str] | None,
    checkpoint: str,
    previous_folds: Sequence[int | str] | None = None,
    **kwargs,
) -> FoldEnsemble:
    """A configuration's folds (default: :meth:`DatasetWorkspace.trained_folds`) from their weights only; a
    cascade stage's with its previous stage's ``previous_folds`` (default: every trained one) before it."""
    if folds is None:
        folds = workspace.trained_folds(configuration, checkpoint)
        if not folds:
            raise WorkspaceError(
                f"no trained fold of {configuration} in {workspace.root / 'models' / configuration}; "
                "run `autoseg train` first"
            )
    names = [str(f) for f in folds]
    repeated = sorted({f for f in names if names.count(f) > 1})
    if repeated:
        raise WorkspaceError(f"fold(s) {', '.join(repeated)} listed more than once")
    weights, onnx_files = [], []
    for fold in names:
        path = workspace.checkpoint(configuration, fold, checkpoint)
        if not path.is_file():
            raise WorkspaceError(f"fold {fold} has no {path.name} in {path.parent}")
        weights.append(load_inference_weights(path))
        exported = path.with_suffix(".onnx")  # written by `autoseg export`
        onnx_files.append(exported if exported.is_file() else None)
    int8_files = [int8_path(workspace.checkpoint(configuration, fold, checkpoint)) for fold in names]
    if kwargs.get("precision") == "int8":
        # torch with int8 is refused before the missing files; the resolved name spares a second "backend auto" line
        device = resolve_device(kwargs.get("device", "auto"))
        kwargs["backend"] = resolve_backend(kwargs.get("backend", "torch"), device, "int8")
        _check_int8(workspace, configuration, names, int8_files)
    log.info("predicting with %s, folds %s (%s checkpoints)", configuration, ", ".join(names), checkpoint)
    previous = _previous_stage(workspace, plan, configuration, previous_folds, checkpoint, kwargs)
    return FoldEnsemble(
        plan, configuration, weights, onnx_files=onnx_files, int8_files=int8_files, previous_stage=previous, **kwargs
    )


def _previous_stage(
    workspace: DatasetWorkspace,
    plan: Plan,
    configuration: str,
    folds: Sequence[int | str] | None,
    checkpoint: str,
    kwargs: dict,
) -> FoldEnsemble | None:
    """A cascade stage's previous stage: its ``folds`` (default: every trained one), run as this stage runs."""
    previous = plan.configuration(configuration).previous_stage
    if previous is None:
        return None
    if folds is None and not workspace.trained_folds(previous, checkpoint):
        raise WorkspaceError(
            f"{configuration} is a cascade stage: it predicts from {previous}'s masks, and {previous} has no trained "
            f"fold ({checkpoint} checkpoint) in {workspace.root / 'models' / previous}; train it first"
        )
    return load_fold_ensemble(workspace, plan, previous, folds, checkpoint, **kwargs)


def _check_int8(workspace: DatasetWorkspace, configuration: str, folds: Sequence[str], files: Sequence[Path]) -> None:
    """``--precision int8`` needs every fold's accepted INT8 model: one line naming the folds that lack one."""
    missing = [fold for fold, path in zip(folds, files) if not path.is_file()]
    if missing:
        raise WorkspaceError(
            f"--precision int8: fold(s) {', '.join(missing)} of {configuration} in {workspace.root} have no accepted "
            f"INT8 model ({files[0].name}); export with `autoseg export -o model.zip --int8` and predict with "
            "-m model.zip (a fold whose check refused INT8, see its deployment.json, needs --precision fp32 or bf16)"
        )
