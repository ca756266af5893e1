"""``autoseg predict``: where the model comes from (a work folder, an exported zip, a folder inside one),
which models predict, and the folder of cases they predict."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from autoseg.core.files import read_json
from autoseg.core.workspace import find_dataset
from autoseg.data.dicom_seg import CODES_KEY
from autoseg.inference.archive import model_source
from autoseg.inference.choice import load_predictor
from autoseg.inference.predictor import PredictionReport, predict_folder


def predict_cases(*, input: Path, output: Path, workdir: Path, model: Path | None = None, dataset: str | None = None,
                  configurations: Sequence[str] | None = None, folds: Sequence[str] | None = None,
                  checkpoint: str | None = None, overwrite: bool = False, save_probabilities: bool = False,
                  nan_to_num: bool = False, output_type: str = "nifti", uncertainty: bool = False,
                  show_progress: bool = True,
                  **predictor_options: Any) -> PredictionReport:
    """Predict every case under ``input`` into ``output``.

    ``model`` (instead of ``workdir``): an exported archive (extracted to a temporary folder for
    the run) or a work, dataset, configuration or fold folder; what it names is the default the
    command line overrides. ``predictor_options`` (device, tta, step, precision, backend) go to
    :func:`autoseg.inference.choice.load_predictor`. ``output_type``: see
    :func:`autoseg.inference.predictor.predict_folder`; DICOM-SEG codes follow the dataset.json's
    ``dicom_seg_codes`` (carried in the work folder or archive).
    """
    with tempfile.TemporaryDirectory(prefix="autoseg-model-") as scratch:
        if model is not None:
            source = model_source(model, Path(scratch))
            workdir, dataset = source.workdir, dataset or source.dataset
            if not (configurations or folds or checkpoint):
                configurations = [source.configuration] if source.configuration else None
                folds, checkpoint = (list(source.folds) if source.folds else None), source.checkpoint
        predictor = load_predictor(workdir, dataset, configurations, folds, checkpoint, **predictor_options)
        record = read_json(find_dataset(workdir, dataset).dataset_json)
        return predict_folder(predictor, input, output, overwrite=overwrite, save_probabilities=save_probabilities,
                              nan_to_num=nan_to_num, output_type=output_type,
                              dicom_seg_codes=record.get(CODES_KEY), uncertainty=uncertainty,
                              show_progress=show_progress)
