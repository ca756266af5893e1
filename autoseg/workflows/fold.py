"""A fold trained, then validated in full: training and prediction composed, one layer above both.

``autoseg train`` (and each tuning trial) trains a fold with :func:`autoseg.training.trainer.train_fold`
and then predicts every validation case with the same predictor as ``autoseg predict``. The
trainer knows nothing of the predictor; this module joins them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoseg.core.checkpoint import load_checkpoint, load_inference_weights
from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Plan, load_plan
from autoseg.core.workspace import DatasetWorkspace, find_dataset
from autoseg.data.io import splits
from autoseg.data.io.dataset_record import load_dataset_record
from autoseg.data.preprocessing.restore import class_names
from autoseg.deploy.archive import model_source
from autoseg.inference.fold_ensemble import DEFAULT_STEP, FoldEnsemble
from autoseg.inference.predictor import Predictor, load_fold_ensemble
from autoseg.training.sampling import load_cases
from autoseg.training.settings import TrainRequest
from autoseg.training.trainer import TrainResult, train_fold
from autoseg.training.transfer import Pretrained
from autoseg.workflows.validation import (
    RealValidation,
    training_subset,
    validate_cases,
    window_tiles,
    write_stage_masks,
)

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """The training run and, when validated (main process only), the validation summary."""

    training: TrainResult
    validation: dict | None
    #: ``train --continue``: the validation summary of the weights it started from, on today's validation cases
    before: dict | None = None


def train_and_validate(
    *,
    workdir: Path,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    fold: str = "0",
    request: TrainRequest | None = None,
    plan: Plan | None = None,
    validate: bool = True,
    tta: bool = True,
    device: str = "auto",
    show_progress: bool = True,
    pretrained: Pretrained | None = None,
    output_folder: Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    **requested: Any,
) -> FoldResult:
    """Train one fold as ``request`` asks (``requested``: its fields as keywords, see :func:`train_fold`), with
    the real Dice of its validation cases every ``request.val_every`` epochs (None: the default interval, 0:
    never), then predict its validation cases in full on the main process."""
    request = TrainRequest.of(request, **requested)
    workspace = find_dataset(workdir, dataset)
    plan = plan if plan is not None else load_plan(workspace.plans)
    real = None
    if str(fold) == "all":  # every case trains: "validating" them would steer checkpoint_best by training Dice
        log.info("fold all: no validation during training (every case is a training case)")
    elif request.val_every != 0:
        real = _real_validation(workspace, plan, configuration, str(fold), device)
    if real is not None and not validate:
        log.info(
            "--no-final-validation turns off only the final pass: the validation cases are still predicted "
            "every %s epochs (--val-every 0 turns that off)",
            request.val_every or "few",
        )
    trained = train_fold(
        workdir=workdir,
        dataset=workspace.name,
        configuration=configuration,
        fold=fold,
        request=request,
        plan=plan,
        device=device,
        show_progress=show_progress,
        validate=real,
        pretrained=pretrained,
        output_folder=output_folder,
        on_epoch_end=on_epoch_end,
    )
    summary = None
    if validate and trained.weights is not None:  # needs no process group: other ranks may have exited already
        summary = validate_weights(
            workspace, plan, configuration, str(fold), trained.folder, trained.weights, device, tta, show_progress
        )
    return FoldResult(trained, summary)


def load_pretrained(model: Path, checkpoint: str = "final", prefer: str | None = None) -> Pretrained:
    """A source model for ``train --pretrained``: what ``predict -m`` accepts (an exported zip, a work or
    dataset folder, ``models/<configuration>`` or a fold folder). The first trained fold of the chosen
    configuration (the one the model names, else ``prefer`` when the model has it trained, else its first)
    gives the weights; its plan gives the channel and class names (regions or labels)."""
    with tempfile.TemporaryDirectory(prefix="autoseg-pretrained-") as scratch:
        source = model_source(model, Path(scratch))
        workspace = find_dataset(source.workdir, source.dataset)
        plan = load_plan(workspace.plans)
        trained_prefer = prefer in plan.configurations and workspace.trained_folds(prefer, checkpoint)
        configuration = source.configuration or (prefer if trained_prefer else next(iter(plan.configurations)))
        folds = list(source.folds or workspace.trained_folds(configuration, checkpoint))
        if not folds:
            raise WorkspaceError(f"{model} holds no trained fold of {configuration} to start from")
        weights = load_inference_weights(workspace.checkpoint(configuration, folds[0], checkpoint))
    return Pretrained(
        weights,
        tuple(plan.channel_names),
        tuple(class_names(plan)),
        f"{model} ({configuration} fold {folds[0]})",
        regions=bool(plan.regions),
    )


def validate_fold(
    *,
    workdir: Path,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    fold: str = "0",
    checkpoint: str = "final",
    device: str = "auto",
    tta: bool = True,
    show_progress: bool = True,
) -> dict:
    """Full-volume validation of a trained fold (``autoseg train --validate-only``)."""
    workspace = find_dataset(workdir, dataset)
    plan = load_plan(workspace.plans)
    plan.configuration(configuration)
    folder = workspace.model(configuration, fold)
    path = folder / f"checkpoint_{checkpoint}.pt"
    if not path.is_file():
        raise WorkspaceError(f"{path} does not exist; train fold {fold} of {configuration} first")
    return validate_weights(
        workspace, plan, configuration, str(fold), folder, load_checkpoint(path)["weights"], device, tta, show_progress
    )


def validate_weights(
    workspace: DatasetWorkspace,
    plan: Plan,
    configuration: str,
    fold: str,
    folder: Path,
    weights: dict[str, torch.Tensor],
    device: str,
    tta: bool,
    show_progress: bool,
    into: str = "validation",
) -> dict:
    """Predict the fold's validation cases in full with ``weights``; predictions and ``summary.json`` go to
    ``folder / into``; into ``validation``, a stage a cascade reads also leaves its masks for the cascade."""
    spec = load_dataset_record(workspace.dataset_json)
    by_id = {c.case_id: c for c in spec.cases}
    _, val_ids = splits.fold_cases(splits.read_splits(workspace.splits, workspace.name), fold, workspace.name)
    stage = _previous_stage(workspace, plan, configuration, fold, device, tta)
    predictor = Predictor.from_weights(plan, configuration, [weights], device=device, tta=tta, **stage)
    summary = validate_cases(predictor, [by_id[c] for c in val_ids], spec, folder / into, show_progress)
    if into == "validation" and fold != "all":  # fold all's masks are of its training cases: no cascade input
        write_stage_masks(workspace, plan, configuration, fold, folder / into, val_ids, spec)
    return summary


def _previous_stage(
    workspace: DatasetWorkspace, plan: Plan, configuration: str, fold: str, device: str, tta: bool
) -> dict[str, FoldEnsemble]:
    """A cascade stage validates with its previous stage's same fold, the model that held these cases out
    (whose masks of them the stage trained with); fold all with every trained fold. Empty for a first stage."""
    previous = plan.configuration(configuration).previous_stage
    if previous is None:
        return {}
    folds = [fold] if workspace.checkpoint(previous, fold).is_file() else None
    return {"previous_stage": load_fold_ensemble(workspace, plan, previous, folds, "final", device=device, tta=tta)}


def _real_validation(
    workspace: DatasetWorkspace, plan: Plan, configuration: str, fold: str, device: str
) -> RealValidation:
    """Validation during training: the fold's validation cases (a seeded subset of a large fold) predicted
    by the same predictor as ``autoseg predict``, without test-time augmentation."""
    spec = load_dataset_record(workspace.dataset_json)
    by_id = {c.case_id: c for c in spec.cases}
    _, val_ids = splits.fold_cases(splits.read_splits(workspace.splits, workspace.name), fold, workspace.name)
    ids = training_subset(val_ids)
    config = plan.configuration(configuration)
    tiles = sum(
        window_tiles(case.data.shape[1:], config.patch_size, DEFAULT_STEP)
        for case in load_cases(workspace.preprocessed(config.data_identifier), ids)
    )
    return RealValidation(
        lambda weights: Predictor.from_weights(
            plan,
            configuration,
            [weights],
            device=device,
            tta=False,
            **_previous_stage(workspace, plan, configuration, fold, device, False),
        ),
        [by_id[c] for c in ids],
        spec,
        tiles,
    )
