"""``autoseg train``: one cross-validation fold of one configuration, read top to bottom.

Everything comes from the plan and :class:`TrainingSettings`; nothing is configured by
subclassing. Small helpers build the data, the model and the optimiser; the loop
trains, measures a patch-based pseudo-Dice, logs and checkpoints every epoch. Predicting the
validation cases in full needs the predictor, a sibling layer: :mod:`autoseg.workflows.fold`
composes the two.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.core.checkpoint import (
    load_checkpoint,
    load_weights,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    weights_digest,
)
from autoseg.core.devices import precision_for, resolve_device
from autoseg.core.errors import AutosegError, WorkspaceError
from autoseg.core.files import atomic_write_bytes
from autoseg.core.plan import Configuration, Plan, load_plan
from autoseg.core.processes import ProcessLock, lock_exclusive, lock_holder
from autoseg.core.progress import progress_bar
from autoseg.core.workspace import DatasetWorkspace, find_dataset
from autoseg.data.io import splits
from autoseg.data.preprocessing.restore import class_names
from autoseg.model.losses import DeepSupervisionLoss, SegmentationLoss, confusion_counts
from autoseg.model.network import build_network, deep_supervision_weights
from autoseg.training import augmentation, cascade, output_prior
from autoseg.training.distributed import (
    DistributedContext,
    MainWait,
    all_reduce_sum,
    init_distributed,
    is_elastic_restart,
    main_wait,
    shutdown,
    split_batch,
    validation_wait_s,
    wait_for_main,
)
from autoseg.training.progress_plot import plot_progress
from autoseg.training.real_validation import (
    DEFAULT_EARLY_STOP_DELTA,
    RealDiceState,
    Validation,
    cooldown_epochs,
    default_val_every,
    mean_real_dice,
)
from autoseg.training.sampling import PatchSampler, forced_foreground, load_cases
from autoseg.training.settings import TrainingSettings, TrainRequest, poly_lr
from autoseg.training.transfer import HEADS, INPUT_LAYER, Pretrained, fresh_classes, transfer_weights

log = logging.getLogger(__name__)
EMA_DECAY = 0.9


@dataclass
class TrainResult:
    """Where the fold was trained, its epoch budget, (on the main process) its final weights on the CPU,
    the epoch early stopping triggered at (None: it ran its budget) and the last epoch it trained then
    (the end of the learning-rate cool-down)."""

    folder: Path
    epochs: int
    weights: dict[str, torch.Tensor] | None
    stopped_epoch: int | None = None
    cooldown_end: int | None = None


def fold_cases(workspace: DatasetWorkspace, fold: str) -> tuple[list[str], list[str]]:
    return splits.fold_cases(splits.read_splits(workspace.splits, workspace.name), fold, workspace.name)


def build_loaders(
    plan: Plan,
    config: Configuration,
    workspace: DatasetWorkspace,
    train_ids: list[str],
    val_ids: list[str],
    settings: TrainingSettings,
    context: DistributedContext,
    start_epoch: int,
    stage_masks: dict[str, Path] | None = None,
):
    """Augmented training batches and plain validation batches for this rank's share of the batch;
    ``stage_masks``: a cascade stage's previous-stage mask of every case (:func:`cascade.stage_masks`)."""
    folder = workspace.preprocessed(config.data_identifier)
    start, size = split_batch(config.batch_size, context)
    forced = forced_foreground(config.batch_size, settings.foreground_fraction)[start : start + size]
    masked = tuple(i for i, n in enumerate(config.normalization) if n.use_mask)
    params = augmentation.augmentation_params(
        config.patch_size,
        config.training.augmentation_strength,
        mask_channels=masked,
        stage_labels=plan.stage_labels if stage_masks is not None else (),
    )
    loading = augmentation.loading_patch_size(config.patch_size, params)
    train_cases, val_cases = (load_cases(folder, ids, stage_masks) for ids in (train_ids, val_ids))
    train = PatchSampler(train_cases, loading, size, forced, final_patch_size=config.patch_size)
    val = PatchSampler(val_cases, config.patch_size, size, forced)
    seeds = np.random.SeedSequence([settings.seed, context.rank, start_epoch]).generate_state(2)
    pin = settings.device == "cuda"
    return (
        augmentation.augmenter(
            train, augmentation.train_transforms(config.patch_size, params), settings.workers, int(seeds[0]), pin
        ),
        augmentation.augmenter(
            val, augmentation.val_transforms(params.stage_labels), min(settings.workers, 1), int(seeds[1]), pin
        ),
    )


def build_model(
    plan: Plan,
    config: Configuration,
    device: torch.device,
    context: DistributedContext,
    compile_model: bool,
    head_bias: list[float] | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to train, the bare network whose state is saved); ``head_bias``: the heads' initial
    bias (:func:`output_prior.initial_head_bias`)."""
    network = build_network(config, plan.input_channels(config), plan.num_classes, head_bias=head_bias).to(device)
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last_3d if config.dims == 3 else torch.channels_last)
    model: torch.nn.Module = network
    if context.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[context.local_rank] if device.type == "cuda" else None
        )
    if compile_model:
        model = torch.compile(model)
    return model, network


def build_loss(plan: Plan, config: Configuration, network: torch.nn.Module) -> DeepSupervisionLoss:
    regions = [r.labels for r in plan.regions] or None
    n_outputs = len(network.decoder)
    loss = SegmentationLoss(regions, config.batch_dice, plan.labels.get("ignore"), config.training.loss)
    return DeepSupervisionLoss(loss, deep_supervision_weights(n_outputs))


def _to_device(batch: dict, device: torch.device, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.as_tensor(batch["data"]).to(device, non_blocking=True)
    target = torch.as_tensor(batch["target"]).to(device, non_blocking=True).long()
    if device.type == "cuda":
        data = data.contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
    return data, target


def train_step(model, loss_fn, optimizer, scaler, batch, device, dims, settings, autocast_dtype) -> float:
    data, target = _to_device(batch, device, dims)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = loss_fn(model(data), target)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        _drop_frozen_gradients(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        _drop_frozen_gradients(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def validation_epoch(network, loss_fn, loader, plan, config, settings, device, context, autocast_dtype) -> dict:
    """Patch-based pseudo-Dice (foreground-oversampled patches of the validation cases)."""
    network.eval()
    regions = [r.labels for r in plan.regions] or None
    counts, losses = None, []
    for _ in range(settings.val_iterations):
        data, target = _to_device(next(loader), device, config.dims)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            output = network(data)
        losses.append(float(loss_fn.loss(output, target)))
        tp, fp, fn = confusion_counts(output, target, regions, plan.labels.get("ignore"))
        batch_counts = torch.stack([tp, fp, fn]).double()
        counts = batch_counts if counts is None else counts + batch_counts
    network.train()
    counts = all_reduce_sum(counts, context)
    tp, fp, fn = counts
    dice = (2 * tp / torch.clamp(2 * tp + fp + fn, min=1)).tolist()
    names = [r.name for r in plan.regions] or [n for n, v in plan.labels.items() if v > 0 and n != "ignore"]
    loss = all_reduce_sum(torch.tensor(float(np.mean(losses)), dtype=torch.float64, device=device), context)
    return {"val_loss": float(loss) / context.world_size, "pseudo_dice": dict(zip(names, dice))}


def _append_log(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _log_entries(path: Path) -> list[dict]:
    """log.jsonl's entries. A kill while a line was written leaves it torn: that last line is dropped, with a
    warning (it is rewritten when the epoch is trained again); a damaged line before it is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise WorkspaceError(
                    f"{path} line {number} is not JSON ({error.msg}); move the file aside to train on"
                ) from error
            log.warning("%s: its last line was torn by a kill (%d characters), dropped", path, len(line))
    return entries


def _truncate_log(path: Path, start_epoch: int) -> None:
    """Drop epochs logged after the checkpoint a resume starts from (a kill can fall in between), and a torn line."""
    if not path.is_file():
        return
    kept = [entry for entry in _log_entries(path) if entry.get("epoch", -1) < start_epoch]
    atomic_write_bytes(path, "".join(json.dumps(entry) + "\n" for entry in kept).encode())


def _epoch_entries(path: Path) -> list[dict]:
    return [e for e in _log_entries(path) if "epoch" in e and "event" not in e]


def _checkpoint_payload(
    network, optimizer, scaler, epoch, settings, config, ema, best, real: RealDiceState
) -> dict[str, Any]:
    return {
        "weights": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
        "rng": rng_state(),
        "settings": settings.to_json(),
        "configuration": dataclasses.asdict(config),
        "pseudo_dice_ema": ema,
        "best_pseudo_dice_ema": best,
        "real_dice": real.to_json(),
    }


@dataclass
class _Run:
    """Everything one training run needs while it loops."""

    plan: Plan
    config: Configuration
    settings: TrainingSettings
    context: DistributedContext
    device: torch.device
    autocast_dtype: torch.dtype | None
    model: torch.nn.Module
    network: torch.nn.Module
    loss_fn: DeepSupervisionLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    folder: Path
    validate: Validation | None = None
    #: the other ranks wait for rank 0's validation here, with a bound (DDP with validation during training)
    wait: MainWait | None = None
    ema: float | None = None
    best: float = -1.0
    real: RealDiceState = dataclasses.field(default_factory=RealDiceState)

    def checkpoint(self, name: str, epoch: int) -> None:
        save_checkpoint(
            self.folder / name,
            _checkpoint_payload(
                self.network,
                self.optimizer,
                self.scaler,
                epoch,
                self.settings,
                self.config,
                self.ema,
                self.best,
                self.real,
            ),
        )


def _resolve_settings(
    workspace: DatasetWorkspace,
    plan: Plan,
    config: Configuration,
    fold: str,
    context: DistributedContext,
    device: torch.device,
    precision: str,
    resumed: dict | None,
    request: TrainRequest,
    pretrained: Pretrained | None,
    validate: Validation | None,
) -> TrainingSettings:
    """The one precedence: command line > the resumed checkpoint's budget > the plan configuration
    (learning rate, foreground share) > the defaults of :class:`TrainingSettings`."""
    defaults = TrainingSettings(dataset=workspace.name, configuration=config.name, fold=fold)
    saved = resumed["settings"] if resumed is not None else {}

    def budget(name: str) -> int:
        return getattr(request, name) or saved.get(name) or getattr(defaults, name)

    cores = os.cpu_count() or 1
    workers = request.workers if request.workers is not None else max(1, min(8, cores // context.world_size - 1))
    return dataclasses.replace(
        defaults,
        epochs=budget("epochs"),
        iterations=budget("iterations"),
        val_iterations=budget("val_iterations"),
        batch_size=config.batch_size,
        initial_lr=config.training.initial_lr,
        foreground_fraction=config.training.foreground_fraction,
        seed=request.seed,
        workers=workers,
        device=device.type,
        precision=precision,
        compile=request.compile_model,
        checkpoint_every=request.checkpoint_every,
        world_size=context.world_size,
        **_fine_tuning({**_epoch_counts(request), "pretrained": pretrained}, saved, budget("epochs"), plan),
        **_validation_schedule(
            validate, request, saved, config.batch_size, budget("iterations"), budget("val_iterations")
        ),
    )


def _epoch_counts(request: TrainRequest) -> dict[str, int | None]:
    return {
        "warmup_epochs": request.warmup_epochs,
        "freeze_encoder_epochs": request.freeze_encoder_epochs,
        "heads_first_epochs": request.heads_first_epochs,
    }


def _validation_schedule(
    validate: Validation | None,
    request: TrainRequest,
    saved: dict,
    batch_size: int,
    iterations: int,
    val_iterations: int,
) -> dict[str, Any]:
    """Real-validation interval and early stopping: given > resumed > defaults (an interval that keeps
    validation near a tenth of the training time; no early stopping)."""
    val_every = request.val_every
    if validate is None:
        if val_every:
            raise ValueError("val_every needs a validate callable")
        every = 0
    elif val_every is not None:
        every = val_every
    elif "val_every" in saved:  # 0 too: a run started without validation resumes without it
        every = saved["val_every"]
    else:
        every = default_val_every(validate.forward_passes, batch_size, iterations, val_iterations)
    return {
        "val_every": every,
        **_early_stopping(request.early_stop, request.early_stop_delta, request.early_stop_cooldown, saved, every),
    }


def _early_stopping(
    early_stop: int | None, delta: float | None, cooldown: int | None, saved: dict, val_every: int
) -> dict[str, Any]:
    """Patience, minimum improvement and cool-down: given > resumed > defaults (off; with it, the default
    delta and the default cool-down rule, None).

    A resumed run keeps its delta, 0 for a checkpoint from before the option existed. Early stopping
    without validation, or a delta or cool-down without early stopping, is refused: each would do nothing."""
    patience = early_stop if early_stop is not None else saved.get("early_stop", 0)
    if patience and not val_every:
        raise AutosegError(
            f"--early-stop {patience} needs real validation during training, and this run has none"
            " (--val-every 0); drop --early-stop or validate with --val-every N"
        )
    if delta is not None and not patience:
        raise AutosegError(
            f"--early-stop-delta {delta:g} needs early stopping, and this run has none; "
            "add --early-stop PATIENCE or drop --early-stop-delta"
        )
    if cooldown is not None and not patience:
        raise AutosegError(
            f"--early-stop-cooldown {cooldown} needs early stopping, and this run has none; "
            "add --early-stop PATIENCE or drop --early-stop-cooldown"
        )
    if delta is None and patience:
        delta = saved.get("early_stop_delta", 0.0) if saved.get("early_stop") else DEFAULT_EARLY_STOP_DELTA
    if cooldown is None and patience:
        cooldown = saved.get("early_stop_cooldown")
    return {"early_stop": patience, "early_stop_delta": delta or 0.0, "early_stop_cooldown": cooldown}


def _fine_tuning(asked: dict[str, Any], saved: dict, epochs: int, plan: Plan) -> dict[str, Any]:
    """Source, warm-up, encoder freeze and heads-first phase of a fine-tuning run: given > resumed > defaults
    (with a pretrained model, a warm-up of a tenth of the budget, at most 50 epochs, and one heads-first
    epoch when some head rows start fresh, unless the budget is that one epoch). ``asked``: the request's
    three epoch counts and ``pretrained``."""
    pretrained: Pretrained | None = asked["pretrained"]
    source = pretrained.source if pretrained is not None else saved.get("pretrained", "")
    fresh = pretrained is not None and fresh_classes(pretrained, class_names(plan), bool(plan.regions))
    defaults = {
        "warmup_epochs": min(50, epochs // 10) if source else 0,
        "freeze_encoder_epochs": 0,
        "heads_first_epochs": min(1, epochs - 1) if fresh else 0,
    }
    return {
        "pretrained": source,
        **{
            name: asked[name] if asked[name] is not None else saved.get(name, default)
            for name, default in defaults.items()
        },
    }


def _restore(run: _Run, state: dict, source: Path) -> int:
    """Load a checkpoint's state into the run; returns the epoch to continue from."""
    load_weights(run.network, state["weights"], str(source))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["grad_scaler"]:
        run.scaler.load_state_dict(state["grad_scaler"])
    run.ema, run.best = state["pseudo_dice_ema"], state["best_pseudo_dice_ema"]
    run.real = RealDiceState.from_json(state.get("real_dice"))
    restore_rng_state(state["rng"])
    return state["epoch"] + 1


def _lr(run: _Run, epoch: int) -> float:
    """The epoch's learning rate: the poly schedule, or after an early stop its cool-down."""
    return poly_lr(run.settings, epoch, run.real.stopped_epoch, run.real.cooldown_end)


def _train_epoch(run: _Run, loader, epoch: int, show_progress: bool) -> list[float]:
    lr = _lr(run, epoch)
    for group in run.optimizer.param_groups:  # see _parameter_groups
        group["lr"], group["frozen"] = lr, group.get("frozen_until", 0) > epoch
    run.model.train()
    losses = []
    with progress_bar(
        f"epoch {epoch + 1}/{run.settings.epochs}", run.settings.iterations, show_progress and run.context.is_main
    ) as advance:
        for _ in range(run.settings.iterations):
            losses.append(
                train_step(
                    run.model,
                    run.loss_fn,
                    run.optimizer,
                    run.scaler,
                    next(loader),
                    run.device,
                    run.config.dims,
                    run.settings,
                    run.autocast_dtype,
                )
            )
            advance(f"loss {losses[-1]:.4f}")
    return losses


def _end_epoch(run: _Run, entry: dict, history: list[dict], epoch: int) -> None:
    """Log, plot and checkpoint (rank 0): a kill after this point loses nothing of the epoch."""
    history.append(entry)
    if not run.context.is_main:
        return
    _append_log(run.folder / "log.jsonl", entry)
    plot_progress(history, run.folder / "progress.png")
    if _improved(run, entry):
        run.checkpoint("checkpoint_best.pt", epoch)
    if "real_dice_mean" in entry and run.real.stopped_epoch is None and run.real.exhausted(run.settings.early_stop):
        _stop(run, epoch)
        _log_early_stop(run)
    if run.real.finished(epoch):
        _log_cooldown_end(run)
    if (
        (epoch + 1) % run.settings.checkpoint_every == 0
        or epoch + 1 == run.settings.epochs
        or run.real.stopped_epoch == epoch
        or run.real.cooldown_end == epoch
    ):
        run.checkpoint("checkpoint_latest.pt", epoch)
    log.info(
        "epoch %d: loss %.4f, pseudo Dice %.3f (EMA %.3f)%s, %.1f s",
        epoch,
        entry["train_loss"],
        entry["pseudo_dice_mean"],
        run.ema,
        f", real Dice {entry['real_dice_mean']:.3f}" if "real_dice_mean" in entry else "",
        entry["epoch_time_s"],
    )


def _improved(run: _Run, entry: dict) -> bool:
    """Whether this epoch is the new best: by the real Dice once the run validates, before that (and in
    runs that never validate) by the pseudo-Dice EMA."""
    if "real_dice_mean" in entry:
        return run.real.update(entry["real_dice_mean"], entry["epoch"], run.settings.early_stop_delta)
    if run.real.best_epoch >= 0 or run.ema <= run.best:
        return False
    run.best = run.ema
    return True


def _stop(run: _Run, epoch: int) -> None:
    """Early stopping triggered at ``epoch``: fix the cool-down that ends the run (the same on every rank)."""
    settings = run.settings
    run.real.stop(epoch, cooldown_epochs(epoch, settings.epochs, settings.early_stop_cooldown))


def _share_stop(run: _Run, epoch: int) -> None:
    """Rank 0 decided in :func:`_end_epoch`; every rank learns it at the validation epochs (all ranks
    know them), so the group starts its cool-down together."""
    if not run.settings.early_stop or (epoch + 1) % run.settings.val_every:
        return
    flag = torch.tensor(float(run.real.stopped_epoch == epoch), dtype=torch.float64, device=run.device)
    if float(all_reduce_sum(flag, run.context)) > 0 and run.real.stopped_epoch != epoch:
        _stop(run, epoch)


def train_fold(
    *,
    workdir: Path,
    dataset: str | None = None,
    configuration: str = "3d_fullres",
    fold: str = "0",
    request: TrainRequest | None = None,
    device: str = "auto",
    show_progress: bool = True,
    plan: Plan | None = None,
    output_folder: Path | None = None,
    pretrained: Pretrained | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    validate: Validation | None = None,
    **requested: Any,
) -> TrainResult:
    """Train one fold as ``request`` asks (:class:`TrainRequest`; ``requested``: its fields as keywords,
    ``train_fold(..., epochs=5)``); continue from the newest checkpoint unless ``request.resume`` is False.

    ``plan`` replaces plans.json (a tuning trial's variant), ``output_folder`` the fold folder, ``pretrained`` the
    initial weights (:mod:`autoseg.training.transfer`). ``on_epoch_end(epoch, entry)`` sees every logged epoch; what
    it raises (``TrialPruned``) ends training. ``validate`` scores the validation cases predicted in full every
    ``val_every`` epochs (rank 0) for ``checkpoint_best.pt`` and ``early_stop*`` (:mod:`.real_validation`)."""
    request = TrainRequest.of(request, **requested)
    workspace = find_dataset(workdir, dataset)
    plan = plan if plan is not None else load_plan(workspace.plans)
    config = plan.configuration(configuration)
    torch_device, context = _device_and_group(device)
    precision, autocast_dtype = precision_for(torch_device)
    train_ids, val_ids, masks = _fold_data(workspace, plan, config, str(fold), pretrained)
    folder = output_folder if output_folder is not None else workspace.model(configuration, fold)
    latest, resumed = _checkpoint_to_resume(folder, request.resume, torch_device)
    settings = _resolve_settings(
        workspace, plan, config, str(fold), context, torch_device, precision, resumed, request, pretrained, validate
    )
    lock = _lock_fold(folder, configuration, fold) if context.is_main else None
    try:
        log_path = folder / "log.jsonl"
        head_bias = output_prior.initial_head_bias(workspace, plan, train_ids) if resumed is None else None
        run = _new_run(plan, config, settings, context, torch_device, precision, autocast_dtype, folder, head_bias)
        _attach_validation(run, validate)
        start, end, history = _begin(run, resumed, latest, log_path, pretrained)
        del resumed  # the optimizer state now lives in the run; do not keep a second copy
        loaders = ()
        try:
            if start < end:
                loaders = build_loaders(plan, config, workspace, train_ids, val_ids, settings, context, start, masks)
            _train_epochs(run, loaders, range(start, end), history, on_epoch_end, show_progress)
            _log_weight_digest(run.network, context, log_path)
            stopped_epoch, cooldown_end = run.real.stopped_epoch, run.real.cooldown_end
            weights = {k: v.detach().cpu() for k, v in run.network.state_dict().items()} if context.is_main else None
        finally:
            run = None  # DDP's reducer holds the process group: _wind_down tears it down after it is freed
            _wind_down(loaders, context)
    finally:
        if lock is not None:
            lock.close()
    return TrainResult(folder, settings.epochs, weights, stopped_epoch, cooldown_end)


def _fold_data(
    workspace: DatasetWorkspace, plan: Plan, config: Configuration, fold: str, pretrained: Pretrained | None
) -> tuple[list[str], list[str], dict[str, Path] | None]:
    """The fold's training and validation cases and, for a cascade stage, their previous-stage masks (refused
    before anything is written when some are missing; None for a first stage)."""
    train_ids, val_ids = fold_cases(workspace, fold)
    if config.previous_stage is None:
        return train_ids, val_ids, None
    first = pretrained.weights.get(INPUT_LAYER) if pretrained is not None else None
    if first is not None and first.shape[1] != plan.input_channels(config):
        raise AutosegError(
            f"{config.name} is a cascade stage: its network reads {plan.input_channels(config)} channels (the "
            f"image's and one per label of {config.previous_stage}'s mask), {pretrained.source} reads "
            f"{first.shape[1]}; start it from a cascade stage's weights, or from none"
        )
    return train_ids, val_ids, cascade.stage_masks(workspace, plan, config, train_ids + val_ids)


def _attach_validation(run: _Run, validate: Validation | None) -> None:
    """Rank 0 validates during training; the others wait for it, with a bound (DDP)."""
    run.validate = validate if run.context.is_main else None
    if run.settings.val_every and validate is not None:
        run.wait = main_wait(run.context, validation_wait_s(validate.forward_passes))


def _begin(
    run: _Run, resumed: dict | None, latest: Path, log_path: Path, pretrained: Pretrained | None
) -> tuple[int, int, list[dict]]:
    """The run restored (or started: log header, pretrained weights); returns the first epoch to train, the
    end of the range, and the epochs logged so far."""
    start_epoch = _start_log(run, resumed, latest, log_path)
    end_epoch = run.settings.epochs if run.real.cooldown_end is None else run.real.cooldown_end + 1
    if pretrained is not None and resumed is None:
        _load_pretrained(run, pretrained, log_path)
    # Only rank 0 writes the log, so only it reads it back (another rank could catch a half-written line).
    history = [e for e in _epoch_entries(log_path) if e["epoch"] < start_epoch] if run.context.is_main else []
    return start_epoch, end_epoch, history


def _checkpoint_to_resume(folder: Path, resume: bool, device: torch.device) -> tuple[Path, dict | None]:
    """The fold's ``checkpoint_latest.pt`` and, when the run resumes and it exists, its contents."""
    latest = folder / "checkpoint_latest.pt"
    resume = resume or is_elastic_restart()  # torchrun restarted the group: continue, whatever the launch said
    return latest, load_checkpoint(latest, device) if resume and latest.is_file() else None


def _train_epochs(
    run: _Run,
    loaders,
    epochs: range,
    history: list[dict],
    on_epoch_end: Callable[[int, dict], None] | None,
    show_progress: bool,
) -> None:
    """Run ``epochs`` in turn until early stopping and its cool-down end them; then (rank 0) save
    ``checkpoint_final.pt``."""
    for epoch in epochs:
        _run_epoch(run, loaders, epoch, history, show_progress)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history[-1])
        _share_stop(run, epoch)
        if run.real.finished(epoch):
            break
    # A run killed after its last checkpoint_latest.pt and before checkpoint_final.pt resumes with nothing
    # left to train: it still ends as the run would have, with the final checkpoint.
    unfinished = not (run.folder / "checkpoint_final.pt").is_file() and epochs.start == epochs.stop
    if run.context.is_main and (len(epochs) or unfinished):
        if not len(epochs):
            log.info("every epoch is trained but checkpoint_final.pt is missing: writing it from the last checkpoint")
        final_epoch = run.real.cooldown_end if run.real.cooldown_end is not None else run.settings.epochs - 1
        run.checkpoint("checkpoint_final.pt", final_epoch)


def _device_and_group(device: str) -> tuple[torch.device, DistributedContext]:
    """The device (each rank its own GPU) and the process group when launched by torchrun."""
    torch_device = resolve_device(device)
    context = init_distributed(torch_device.type)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", context.local_rank)
        torch.backends.cudnn.benchmark = True
    return torch_device, context


def _wind_down(loaders: tuple, context: DistributedContext) -> None:
    """Stop the augmentation workers, then the process group (the caller has dropped its DDP model: gloo's
    threads would otherwise outlive the group and may abort the process at interpreter exit)."""
    for loader in loaders:
        if hasattr(loader, "_finish"):
            loader._finish()
    gc.collect()
    shutdown(context)


def _run_epoch(run: _Run, loaders: tuple, epoch: int, history: list[dict], show_progress: bool) -> None:
    """Train one epoch, measure the pseudo-Dice on validation patches, then log and checkpoint it."""
    started = time.perf_counter()
    losses = _train_epoch(run, loaders[0], epoch, show_progress)
    train_seconds = time.perf_counter() - started
    metrics = validation_epoch(
        run.network,
        run.loss_fn,
        loaders[1],
        run.plan,
        run.config,
        run.settings,
        run.device,
        run.context,
        run.autocast_dtype,
    )
    mean_dice = float(np.mean(list(metrics["pseudo_dice"].values())))
    run.ema = mean_dice if run.ema is None else EMA_DECAY * run.ema + (1 - EMA_DECAY) * mean_dice
    mean_loss = torch.tensor(float(np.mean(losses)), dtype=torch.float64, device=run.device)
    train_loss = float(all_reduce_sum(mean_loss, run.context)) / run.context.world_size
    epoch_seconds = time.perf_counter() - started
    _end_epoch(
        run,
        {
            "epoch": epoch,
            "train_loss": train_loss,
            **metrics,
            "pseudo_dice_mean": mean_dice,
            "pseudo_dice_ema": run.ema,
            "lr": _lr(run, epoch),
            "epoch_time_s": epoch_seconds,
            "iterations_per_s": run.settings.iterations / train_seconds,
            **_real_dice(run, epoch),
        },
        history,
        epoch,
    )
    if run.settings.val_every and (epoch + 1) % run.settings.val_every == 0:
        wait_for_main(run.context, run.wait, f"validating epoch {epoch}")


def _real_dice(run: _Run, epoch: int) -> dict:
    """Every ``val_every`` epochs (rank 0): the validation cases predicted in full and scored, for the log."""
    if run.validate is None or (epoch + 1) % run.settings.val_every:
        return {}
    started = time.perf_counter()
    state = rng_state()  # building the predictor draws initial weights: keep the training stream as it was
    dice = run.validate(run.network.state_dict())
    restore_rng_state(state)
    return {
        "real_dice": dice,
        "real_dice_mean": mean_real_dice(dice, run.plan.scored_classes),
        "real_dice_time_s": time.perf_counter() - started,
    }


def _new_run(
    plan: Plan,
    config: Configuration,
    settings: TrainingSettings,
    context: DistributedContext,
    device: torch.device,
    precision: str,
    autocast_dtype: torch.dtype | None,
    folder: Path,
    head_bias: list[float] | None,
) -> _Run:
    torch.manual_seed(settings.seed + context.rank)
    np.random.seed(settings.seed + context.rank)
    model, network = build_model(plan, config, device, context, settings.compile, head_bias)
    optimizer = torch.optim.SGD(
        _parameter_groups(network, settings),
        lr=settings.initial_lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    return _Run(
        plan,
        config,
        settings,
        context,
        device,
        autocast_dtype,
        model,
        network,
        build_loss(plan, config, network),
        optimizer,
        torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        folder,
    )


def _parameter_groups(network: torch.nn.Module, settings: TrainingSettings) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, one per epoch until which its parameters stay frozen: the encoder
    for ``freeze_encoder_epochs``, everything but the heads for ``heads_first_epochs``. One group when
    nothing is frozen (and the groups of runs that only freeze the encoder are as they always were, so
    their checkpoints resume)."""
    body = settings.heads_first_epochs
    encoder = max(settings.freeze_encoder_epochs, body)
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        until = 0 if name.startswith(HEADS) else encoder if name.startswith("encoder.") else body
        groups.setdefault(until, []).append(parameter)
    if list(groups) == [0]:
        return [{"params": groups[0]}]
    return [{"params": params, "frozen_until": until} for until, params in groups.items()]


def _drop_frozen_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Frozen groups get no gradient: the optimizer skips them, so they neither move nor gather momentum
    (which would otherwise be released at once when they thaw) nor take a share of the clipped norm."""
    for group in optimizer.param_groups:
        if group.get("frozen"):
            for parameter in group["params"]:
                parameter.grad = None


def _start_log(run: _Run, resumed: dict | None, source: Path, log_path: Path) -> int:
    """Restore a resumed run and log its start (rank 0); returns the first epoch to train."""
    start_epoch = 0
    if resumed is not None:
        start_epoch = _restore(run, resumed, source)
        log.info("resuming %s fold %s from epoch %d", run.config.name, run.settings.fold, start_epoch)
        if run.real.finished(start_epoch - 1):
            log.info(
                "this run stopped early at epoch %d and ended at %d: nothing is trained (--no-resume trains it again)",
                run.real.stopped_epoch,
                run.real.cooldown_end,
            )
        elif run.real.stopped_epoch is not None:
            log.info(
                "this run stopped early at epoch %d: its learning-rate cool-down goes on to epoch %d",
                run.real.stopped_epoch,
                run.real.cooldown_end,
            )
        if start_epoch > run.settings.epochs:
            log.warning(
                "the checkpoint is past --epochs %d (%d epochs done): nothing is trained; use "
                "--no-resume to start again with the smaller budget",
                run.settings.epochs,
                start_epoch,
            )
    if run.context.is_main:
        if resumed is not None:
            _truncate_log(log_path, start_epoch)
        else:
            log_path.unlink(missing_ok=True)
        _append_log(
            log_path,
            {
                "event": "start",
                "start_epoch": start_epoch,
                "settings": run.settings.to_json(),
                "configuration": dataclasses.asdict(run.config),
            },
        )
    return start_epoch


def _load_pretrained(run: _Run, pretrained: Pretrained, log_path: Path) -> None:
    """Start from the pretrained weights; say what was loaded, adapted and started fresh, and how the
    heads-first phase trains the fresh rows (log and log.jsonl)."""
    mapped = run.plan.planned_like.channel_map if run.plan.planned_like is not None else {}
    report = transfer_weights(
        run.network, pretrained, run.plan.channel_names, class_names(run.plan), bool(run.plan.regions), mapped
    )
    log.info(
        "pretrained %s: %d weight tensors loaded, adapted: %s, started fresh: %s",
        pretrained.source,
        len(report.loaded),
        report.adapted or "none",
        len(report.reinitialised) or "none",
    )
    for note in report.notes:
        log.info("pretrained: %s", note)
    if run.settings.heads_first_epochs:
        log.info(
            "pretrained: only the segmentation heads train for the first %d epoch(s), then all weights",
            run.settings.heads_first_epochs,
        )
    if run.context.is_main:
        _append_log(log_path, {"event": "pretrained", "source": pretrained.source, **report.to_json()})


def _log_early_stop(run: _Run) -> None:
    """Say that, when and why training stops before its budget, and its cool-down (rank 0: log and log.jsonl,
    before the checkpoint that holds the stop, so a resumed run never misses the event)."""
    real, settings = run.real, run.settings
    log.info(
        "early stop at epoch %d: the real Dice has not beaten %.4f (epoch %d) by more than %g for %d "
        "validations; the learning rate cools down to 0 over %d epochs, to epoch %d (%d of %d epochs)",
        real.stopped_epoch,
        real.best,
        real.best_epoch,
        settings.early_stop_delta,
        settings.early_stop,
        real.cooldown_end - real.stopped_epoch,
        real.cooldown_end,
        real.cooldown_end + 1,
        settings.epochs,
    )
    _append_log(
        run.folder / "log.jsonl",
        {
            "event": "early_stop",
            "epoch": real.stopped_epoch,
            "best_epoch": real.best_epoch,
            "best_real_dice": real.best,
            "patience": settings.early_stop,
            "delta": settings.early_stop_delta,
            "cooldown_epochs": real.cooldown_end - real.stopped_epoch,
            "cooldown_end": real.cooldown_end,
            "iterations": (real.stopped_epoch + 1) * settings.iterations,
            "budget_iterations": settings.epochs * settings.iterations,
        },
    )


def _log_cooldown_end(run: _Run) -> None:
    """Say that the stopped run's cool-down is over (rank 0: log and log.jsonl): its last epoch, the best by then."""
    real, settings = run.real, run.settings
    if real.cooldown_end == real.stopped_epoch:  # no cool-down: the early_stop event said it all
        return
    log.info(
        "cool-down over after epoch %d; best real Dice %.4f (epoch %d)", real.cooldown_end, real.best, real.best_epoch
    )
    _append_log(
        run.folder / "log.jsonl",
        {
            "event": "cooldown_end",
            "epoch": real.cooldown_end,
            "stopped_epoch": real.stopped_epoch,
            "best_epoch": real.best_epoch,
            "best_real_dice": real.best,
            "iterations": (real.cooldown_end + 1) * settings.iterations,
            "budget_iterations": settings.epochs * settings.iterations,
        },
    )


def _lock_fold(folder: Path, configuration: str, fold: str) -> ProcessLock:
    """An exclusive lock on the fold's folder: two runs of one fold would interleave their logs and checkpoints.

    The lock is the OS's and this process's alone (not its augmentation workers'), so a killed
    run leaves none behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_exclusive(folder / ".lock", f"process {os.getpid()} on {socket.gethostname()}")
    if lock is None:
        holder = lock_holder(folder / ".lock") or "another process"
        raise WorkspaceError(
            f"{configuration} fold {fold} is being trained by {holder} ({folder}); wait for it to finish or stop it"
        )
    return lock


def _log_weight_digest(network: torch.nn.Module, context: DistributedContext, log_path: Path) -> None:
    """Record every rank's weight checksum: identical values prove DDP kept the replicas in sync."""
    value = weights_digest(network.state_dict())
    digests = [value]
    if context.enabled:
        import torch.distributed as dist

        gathered = [None] * context.world_size
        dist.all_gather_object(gathered, value)
        digests = gathered
    if context.is_main:
        _append_log(log_path, {"event": "end", "weight_digests": digests})
