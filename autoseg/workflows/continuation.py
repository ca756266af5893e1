"""``autoseg train --fold k --continue``: a finished fold goes on learning after cases were added.

After new cases are added and ``autoseg plan`` is run again (splits stay stable: every new
case joins one fold's validation set, so it is a training case of the others), a fold need
not be trained again from scratch. The continuation starts from the fold's
``checkpoint_final.pt`` with a short schedule:

- ``--epochs N`` epochs (default: a tenth of the finished run's, at least 1), numbered from 0;
- an initial learning rate a tenth of the configuration's (``CONTINUE_LR_FACTOR``: 1e-3 for
  the default 1e-2), reached by a linear warm-up over the first tenth of N (at most 50
  epochs, ``--warmup-epochs`` overrides; the warm-up of ``--pretrained``), then poly decay to 0.

Before it trains, the old final weights are validated on *today's* validation cases
(``validation_before_continue/``); after it, the new ones (``validation/``), and
``continue.json`` holds both means. The old ``log.jsonl`` is kept as
``log_before_continue_<digest>.jsonl``.

Resume: ``continue.json`` is written before the first epoch with ``status: training`` and the
digest of the weights it started from. A killed continuation run again with ``--continue``
resumes from its own ``checkpoint_latest.pt`` (the old run's latest is never resumed: it is
past its budget); with ``--no-resume`` it starts again from ``checkpoint_final.pt``, which stays
the old model until the continuation ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from autoseg.core.checkpoint import load_checkpoint, weights_digest
from autoseg.core.errors import CheckpointError, WorkspaceError
from autoseg.core.files import atomic_path, read_json, write_json
from autoseg.core.plan import Configuration, Plan, load_plan
from autoseg.core.workspace import find_dataset
from autoseg.data.preprocessing.restore import class_names
from autoseg.model.network import build_network
from autoseg.training.settings import TrainRequest
from autoseg.training.trainer import TrainResult, train_fold
from autoseg.training.transfer import Pretrained
from autoseg.workflows.fold import FoldResult, validate_weights

log = logging.getLogger(__name__)
CONTINUE_LR_FACTOR = 0.1
DEFAULT_EPOCH_SHARE = 10
RECORD = "continue.json"
BEFORE = "validation_before_continue"


def continue_fold(
    *,
    workdir: Path,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    fold: str = "0",
    request: TrainRequest | None = None,
    validate: bool = True,
    tta: bool = True,
    device: str = "auto",
    show_progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    **requested: Any,
) -> FoldResult:
    """Continue a finished fold as ``request`` asks (``requested``: its fields as keywords, see
    :func:`train_fold`, as is ``on_epoch_end``); validate before and after on the fold's current validation cases."""
    request = TrainRequest.of(request, **requested)
    epochs = request.epochs
    workspace = find_dataset(workdir, dataset)
    plan = load_plan(workspace.plans)
    config = plan.configuration(configuration)
    folder = workspace.model(configuration, fold)
    final_path = _final_checkpoint(folder, configuration, fold)
    final = load_checkpoint(final_path, mmap=True)
    _check_fits(plan, config, final["weights"], fold)
    record = _ongoing(folder, final) if request.resume else None
    if record is None:
        record = _start(
            workspace, plan, configuration, str(fold), folder, final, epochs, validate, tta, device, show_progress
        )
    else:
        log.info("resuming the continuation of %s fold %s (%s)", configuration, fold, record["source"])
    lowered = _lowered_lr(plan, config)
    finished = load_checkpoint(final_path, mmap=True)["settings"].get("pretrained") == record["source"]
    own_latest, pretrained = _starting_point(plan, folder, final, record["source"])
    del final
    if finished:
        trained_weights = load_checkpoint(final_path)["weights"]
        trained_folder = folder
    else:
        request = dataclasses.replace(request, epochs=epochs or record["epochs"], resume=own_latest)
        where = {"workdir": workdir, "dataset": workspace.name, "configuration": configuration, "fold": fold}
        run = {"device": device, "show_progress": show_progress, "on_epoch_end": on_epoch_end}
        trained = train_fold(**where, **run, request=request, plan=lowered, pretrained=pretrained)
        _finish_final(folder, record["source"])
        trained_weights, trained_folder = trained.weights, trained.folder
    after = None
    if validate:
        after = validate_weights(
            workspace, plan, configuration, str(fold), folder, trained_weights, device, tta, show_progress
        )
    before = {"mean": record["before"]} if record.get("before") else None
    write_json(folder / RECORD, {**record, "status": "done", "after": after["mean"] if after else None})
    _report(record, after)
    return FoldResult(TrainResult(trained_folder, record["epochs"], trained_weights), after, before)


def _final_checkpoint(folder: Path, configuration: str, fold: str) -> Path:
    """The finished fold's ``checkpoint_final.pt``; --continue runs in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WorkspaceError(
            "--continue runs in one process (it validates before training): launch it without torchrun"
        )
    final_path = folder / "checkpoint_final.pt"
    if not final_path.is_file():
        raise WorkspaceError(
            f"{configuration} fold {fold} has no checkpoint_final.pt in {folder}: --continue goes "
            f"on from a finished fold; train it first (`autoseg train -c {configuration} --fold "
            f"{fold}`)"
        )
    return final_path


def _starting_point(plan: Plan, folder: Path, final: dict, source: str) -> tuple[bool, Pretrained | None]:
    """Whether the continuation resumes its own ``checkpoint_latest.pt``, and otherwise the final weights it
    starts from (the old run's latest is never resumed: it is past its budget)."""
    latest = folder / "checkpoint_latest.pt"
    own_latest = latest.is_file() and load_checkpoint(latest, mmap=True)["settings"].get("pretrained") == source
    if own_latest:
        return True, None
    weights = {k: v.clone() for k, v in final["weights"].items()}
    return False, Pretrained(
        weights, tuple(plan.channel_names), tuple(class_names(plan)), source, regions=bool(plan.regions)
    )


def _check_fits(plan: Plan, config: Configuration, weights: dict[str, torch.Tensor], fold: str) -> None:
    """The final weights must fit the network plans.json describes now (re-planning may change the topology)."""
    with torch.device("meta"):
        network = build_network(config, plan.input_channels(config), plan.num_classes)
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected == found:
        return
    name = next((k for k in expected if expected[k] != found.get(k)), None) or next(
        k for k in found if k not in expected
    )
    raise CheckpointError(
        f"{config.name} fold {fold}'s checkpoint_final.pt does not fit the network plans.json describes now ({name}: "
        f"{found.get(name, 'absent')} in the checkpoint, {expected.get(name, 'absent')} in the plan): the plan's "
        "topology changed since the fold was trained, so --continue cannot go on from it; keep the topology by "
        "planning with --like an export of the old model, or train the fold again with --no-resume"
    )


def _ongoing(folder: Path, final: dict) -> dict | None:
    """The record of a continuation that started from today's final weights and did not end, else None."""
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None  # unreadable: start again from the final weights, which are intact
    if not isinstance(record, dict) or record.get("status") != "training":
        return None
    started_here = weights_digest(final["weights"]) == record.get("from_digest")
    ended_training = final["settings"].get("pretrained") == record.get("source")
    return record if started_here or ended_training else None


def _start(
    workspace,
    plan: Plan,
    configuration: str,
    fold: str,
    folder: Path,
    final: dict,
    epochs: int | None,
    validate: bool,
    tta: bool,
    device: str,
    show_progress: bool,
) -> dict:
    """Validate the final weights on today's validation cases, keep the old log, write the record."""
    digest = weights_digest(final["weights"])
    done_epochs = int(final["epoch"]) + 1
    epochs = epochs or max(1, int(final["settings"]["epochs"]) // DEFAULT_EPOCH_SHARE)
    source = f"{configuration} fold {fold} checkpoint_final.pt (epoch {done_epochs}, weights {digest})"
    before = None
    if validate:
        weights = {k: v.clone() for k, v in final["weights"].items()}
        before = validate_weights(
            workspace, plan, configuration, fold, folder, weights, device, tta, show_progress, into=BEFORE
        )
    log_path = folder / "log.jsonl"
    if log_path.is_file():
        os.replace(log_path, folder / f"log_before_continue_{digest}.jsonl")
    record = {
        "version": 1,
        "status": "training",
        "source": source,
        "from_digest": digest,
        "from_epochs": done_epochs,
        "epochs": epochs,
        "lr_factor": CONTINUE_LR_FACTOR,
        "before": before["mean"] if before else None,
    }
    write_json(folder / RECORD, record)
    log.info("continuing %s fold %s from %s for %d epochs", configuration, fold, source, epochs)
    return record


def _lowered_lr(plan: Plan, config: Configuration) -> Plan:
    training = dataclasses.replace(config.training, initial_lr=config.training.initial_lr * CONTINUE_LR_FACTOR)
    return dataclasses.replace(
        plan, configurations={**plan.configurations, config.name: dataclasses.replace(config, training=training)}
    )


def _finish_final(folder: Path, source: str) -> None:
    """A run killed between its last checkpoint_latest.pt and checkpoint_final.pt, resumed, trains nothing and
    writes no final: the latest (the same state) becomes the final."""
    final = folder / "checkpoint_final.pt"
    if load_checkpoint(final, mmap=True)["settings"].get("pretrained") == source:
        return
    with atomic_path(final) as tmp:
        shutil.copyfile(folder / "checkpoint_latest.pt", tmp)


def _report(record: dict, after: dict | None) -> None:
    if record.get("before") and after:
        for name, value in after["mean"].items():
            log.info(
                "%s: validation Dice %.3f before the continuation, %.3f after",
                name,
                record["before"].get(name, float("nan")),
                value,
            )
