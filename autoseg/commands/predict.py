"""``autoseg predict``: where the model comes from (a work folder, an exported zip, a folder inside one),
which models predict, and the folder of cases they predict."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

from autoseg.core.errors import PlanError
from autoseg.core.files import read_json
from autoseg.core.plan import Plan
from autoseg.core.workspace import DatasetWorkspace, find_dataset
from autoseg.data.io.dicom_seg import CODES_KEY
from autoseg.data.preprocessing.fingerprint import load_fingerprint
from autoseg.data.qc.flags import TrainingReference, training_reference
from autoseg.data.qc.uncertainty import structures_of
from autoseg.deploy.archive import model_source
from autoseg.inference.choice import load_predictor
from autoseg.inference.predictor import PredictionReport, predict_folder

log = logging.getLogger(__name__)


def predict_cases(*, input: Path, output: Path, workdir: Path, model: Path | None = None, dataset: str | None = None,
                  configurations: Sequence[str] | None = None, folds: Sequence[str] | None = None,
                  checkpoint: str | None = None, overwrite: bool = False, save_probabilities: bool = False,
                  nan_to_num: bool = False, output_type: str = "nifti", uncertainty: bool = False,
                  statistics: bool = False, show_progress: bool = True,
                  **predictor_options: Any) -> PredictionReport:
    """Predict every case under ``input`` into ``output``.

    ``model`` (instead of ``workdir``): an exported archive (extracted to a temporary folder for
    the run) or a work, dataset, configuration or fold folder; what it names is the default the
    command line overrides. ``predictor_options`` (device, tta, step, precision, backend) go to
    :func:`autoseg.inference.choice.load_predictor`. ``output_type``: see
    :func:`autoseg.inference.predictor.predict_folder`; DICOM-SEG codes follow the dataset.json's
    ``dicom_seg_codes`` (carried in the work folder or archive). The quality-control flags compare
    every case with the training cases' ``fingerprint.json`` (:func:`quality_reference`).
    """
    with tempfile.TemporaryDirectory(prefix="autoseg-model-") as scratch:
        if model is not None:
            source = model_source(model, Path(scratch))
            workdir, dataset = source.workdir, dataset or source.dataset
            if not (configurations or folds or checkpoint):
                configurations = [source.configuration] if source.configuration else None
                folds, checkpoint = (list(source.folds) if source.folds else None), source.checkpoint
        predictor = load_predictor(workdir, dataset, configurations, folds, checkpoint, **predictor_options)
        workspace = find_dataset(workdir, dataset)
        record = read_json(workspace.dataset_json)
        return predict_folder(predictor, input, output, overwrite=overwrite, save_probabilities=save_probabilities,
                              nan_to_num=nan_to_num, output_type=output_type,
                              dicom_seg_codes=record.get(CODES_KEY), uncertainty=uncertainty, statistics=statistics,
                              reference=quality_reference(workspace, predictor.plan), show_progress=show_progress)


def quality_reference(workspace: DatasetWorkspace, plan: Plan) -> TrainingReference | None:
    """The training cases' reference for the QC flags, from the work folder's (or archive's) fingerprint.json;
    None, with a warning, when there is none: the flags that compare with training are then not raised."""
    try:
        fingerprint = load_fingerprint(workspace.fingerprint)
    except PlanError as exc:
        log.warning("no training reference for the quality-control flags (%s): only the flags that need none "
                    "are raised", exc)
        return None
    return training_reference(fingerprint, structures_of(plan))
