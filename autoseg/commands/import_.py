"""``autoseg import``: install a model into a work folder: an archive of ``autoseg export``
(:func:`autoseg.deploy.archive.import_model`), or a model trained by nnU-Net v2, its results folder or the zip of
``nnUNetv2_export_model_to_zip`` (:func:`autoseg.deploy.nnunet.import_nnunet`).

An nnU-Net model arrives without its training data, so what needs them is missing at first: ``export --int8``
(calibration and its check on the folds' validation cases) and the QC references of ``report.json`` (body
intensities and structure volumes of the training cases). ``--data`` gives the labelled dataset the model learnt
from: it is fingerprinted, split as nnU-Net splits (or by the dataset's ``splits_final.json``) and preprocessed
with the *imported* plan, before anything is installed.

Named ``import_`` because ``import`` is a Python keyword (``from autoseg.commands.import import ...`` would not
parse)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from autoseg.core.errors import OptionError, WorkspaceError
from autoseg.core.files import write_json
from autoseg.core.plan import load_plan
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.io.dataset_record import dataset_record
from autoseg.data.io.datasets import discover_dataset
from autoseg.data.io.dicom_seg import dataset_code_overrides
from autoseg.data.io.splits import splits_document
from autoseg.data.preprocessing.fingerprint import compute_fingerprint, save_fingerprint
from autoseg.data.preprocessing.pipeline import preprocess_configurations
from autoseg.deploy.archive import import_model
from autoseg.deploy.nnunet import import_nnunet, is_nnunet_model


def import_archive(
    *,
    archive: Path,
    workdir: Path,
    overwrite: bool = False,
    data: Path | None = None,
    workers: int = 1,
    show_progress: bool = True,
) -> str:
    """Install ``archive`` (an nnU-Net model with its training dataset ``data`` when given); returns the line
    ``import`` prints."""
    archive = Path(archive).expanduser()
    if is_nnunet_model(archive):
        prepare = None
        if data is not None:
            prepare = partial(
                add_training_data, data=Path(data).expanduser(), workers=workers, show_progress=show_progress
            )
        workspace = import_nnunet(source=archive, workdir=workdir, overwrite=overwrite, prepare=prepare)
        with_data = f", with {data} preprocessed for it" if data is not None else ""
        return f"imported nnU-Net model {workspace.name} into {workspace.root}{with_data}"
    if archive.is_dir():
        raise WorkspaceError(
            f"{archive} is neither an nnU-Net v2 results folder (Trainer__Plans__configuration with plans.json) "
            "nor a model archive"
        )
    if data is not None:
        raise OptionError(
            "--data adds the training dataset of an nnU-Net model; an autoseg archive is imported without it",
            "--data",
        )
    workspace = import_model(archive=archive, workdir=workdir, overwrite=overwrite)
    return f"imported {workspace.name} into {workspace.root}"


def add_training_data(workspace: DatasetWorkspace, *, data: Path, workers: int, show_progress: bool) -> None:
    """Fingerprint, split and preprocess ``data`` with the plan in ``workspace`` (an imported model's, not yet
    installed), so that everything needing the training cases works as for a model trained by autoseg.

    The dataset must declare the model's channels and labels; a case that cannot be read is refused, naming it.
    The fingerprint replaces the one converted from nnU-Net's (which has no per-case intensities or volumes, the
    QC references); the plan, and with it the normalisation the model learnt with, stays nnU-Net's.
    """
    plan = load_plan(workspace.plans)
    spec = discover_dataset(data, keep_case_problems=True)
    ours = (list(spec.channel_names), spec.labels, [dataclasses.asdict(r) for r in spec.regions])
    model = (list(plan.channel_names), plan.labels, [dataclasses.asdict(r) for r in plan.regions])
    if ours != model:
        raise WorkspaceError(
            f"{data} is not the dataset model {plan.dataset} learnt from: it has channels {ours[0]} and labels "
            f"{ours[1]}, the model {model[0]} and {model[1]}"
        )
    fingerprint = compute_fingerprint(spec, workers, show_progress)
    codes = dataset_code_overrides(spec.root)
    save_fingerprint(workspace.fingerprint, fingerprint | {"dataset": plan.dataset})
    write_json(workspace.dataset_json, dataset_record(spec) | {"name": plan.dataset} | codes)
    write_json(workspace.splits, splits_document([c.case_id for c in spec.cases], spec.root))
    preprocess_configurations(workspace, spec, plan, workers, show_progress)
