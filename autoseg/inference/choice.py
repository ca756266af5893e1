"""Which configurations, folds and checkpoint predict: one precedence for ``predict``, ``predict -m`` and ``export``.

Options given on the command line (any of configurations, folds, checkpoint) > ``inference.json``
(``autoseg select``'s choice, with its post-processing, calibration temperature and the verdicts of its bf16
and OpenVINO checks) > the caller's default configurations with every trained fold and the final checkpoint.
The precedence holds per option: ``predict -f 0`` takes inference.json's configurations and checkpoint with fold 0,
and keeps what was chosen for them (:func:`_keep_applicable`); what no longer applies is dropped
with one line saying why. An exported
archive is a small work folder, so ``predict -m model.zip`` follows the same rule; its manifest
supplies the defaults (see :func:`autoseg.deploy.archive.model_source`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoseg.core.devices import cpu_has_native_bf16, resolve_device
from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Plan, load_plan
from autoseg.core.workspace import DatasetWorkspace, find_dataset
from autoseg.data.evaluation.postprocessing import Step
from autoseg.inference.backends import auto_backend, resolve_backend
from autoseg.inference.instructions import InferenceInstructions, read_instructions
from autoseg.inference.predictor import Predictor, load_fold_ensemble

log = logging.getLogger(__name__)
DEFAULT_CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class ModelChoice:
    """The models to predict with, and why (``follows_inference_json``)."""

    configurations: tuple[str, ...]
    folds: dict[str, tuple[str, ...] | None]  # None: every trained fold
    checkpoint: str
    postprocessing: tuple[Step, ...] = ()
    temperature: float = 1.0
    follows_inference_json: bool = False
    bf16_accepted: bool = False
    #: ``select``'s OpenVINO check passed on these folds: ``--backend auto`` runs OpenVINO on a CPU
    openvino_accepted: bool = False


def choose_models(
    workspace: DatasetWorkspace,
    plan: Plan,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str | None = None,
    default_configurations: Sequence[str] = (DEFAULT_CONFIGURATION,),
    keep_applicable: bool = True,
) -> ModelChoice:
    """Apply the precedence; every named configuration must be in the plan. ``keep_applicable=False``
    (``export``): with any option given, inference.json is not read at all."""
    explicit = bool(configurations) or folds is not None or checkpoint is not None
    if workspace.inference.is_file() and not explicit:
        chosen = read_instructions(workspace.inference)
        log.info(
            "following %s: %s, post-processing: %s",
            workspace.inference.name,
            " + ".join(chosen.configurations),
            len(chosen.postprocessing) or "none",
        )
        choice = ModelChoice(
            chosen.configurations,
            {c: tuple(map(str, chosen.folds[c])) for c in chosen.configurations},
            chosen.checkpoint,
            chosen.postprocessing,
            chosen.temperature,
            True,
            chosen.bf16_accepted,
            chosen.openvino_accepted,
        )
    elif workspace.inference.is_file() and keep_applicable:
        choice = _keep_applicable(read_instructions(workspace.inference), configurations, folds, checkpoint)
    else:
        if workspace.inference.is_file():
            log.info("not following %s: models chosen on the command line", workspace.inference.name)
        names = tuple(configurations or default_configurations)
        wanted = tuple(str(f) for f in folds) if folds is not None else None
        choice = ModelChoice(names, {c: wanted for c in names}, checkpoint or "final")
    repeated = sorted({c for c in choice.configurations if choice.configurations.count(c) > 1})
    if repeated:
        raise WorkspaceError(f"configuration(s) listed twice: {', '.join(repeated)}")
    unplanned = [c for c in choice.configurations if c not in plan.configurations]
    if unplanned:
        raise WorkspaceError(
            f"configuration(s) {', '.join(unplanned)} are not in {workspace.plans} (planned: "
            f"{', '.join(plan.configurations)})"
        )
    return choice


def _keep_applicable(
    chosen: InferenceInstructions,
    configurations: Sequence[str] | None,
    folds: Sequence[int | str] | None,
    checkpoint: str | None,
) -> ModelChoice:
    """Options given, inference.json present: each option not given comes from inference.json, and what it
    chose stays where it still applies. Post-processing and the temperature were fitted on each fold's own
    validation cases for these configurations at this checkpoint, so they hold for any of their folds;
    another configuration set or checkpoint has other outputs, and drops them. bf16 and OpenVINO were checked on
    inference.json's folds: their acceptance holds for those only. One line says what was kept and dropped, and
    why."""
    names = tuple(configurations) if configurations else chosen.configurations
    checkpoint = checkpoint or chosen.checkpoint
    if folds is not None:
        wanted = {c: tuple(str(f) for f in folds) for c in names}
    else:
        wanted = {c: tuple(map(str, chosen.folds[c])) if c in chosen.folds else None for c in names}
    same_models = set(names) == set(chosen.configurations) and checkpoint == chosen.checkpoint
    why = (
        f"it was chosen for {' + '.join(chosen.configurations)} at checkpoint {chosen.checkpoint}, "
        f"not {' + '.join(names)} at {checkpoint}"
    )
    if not same_models:  # its fold choice too was made for those models: every trained fold, unless -f names some
        log.warning("inference.json: post-processing, temperature, bf16 and openvino acceptance dropped: %s", why)
        return ModelChoice(names, wanted if folds is not None else {c: None for c in names}, checkpoint)
    checked = all(w is not None and set(w) <= set(map(str, chosen.folds[c])) for c, w in wanted.items())
    accepted = " and ".join(
        n for n, ok in (("bf16", chosen.bf16_accepted), ("openvino", chosen.openvino_accepted)) if ok
    )
    kept = f"inference.json: kept post-processing ({len(chosen.postprocessing) or 'none'}), temperature"
    if accepted and not checked:
        log.warning("%s %.3g; %s acceptance dropped: it was checked on other folds", kept, chosen.temperature, accepted)
    else:
        also = f", {accepted} acceptance" if accepted else ""
        log.info("%s %.3g%s for the folds chosen", kept, chosen.temperature, also)
    return ModelChoice(
        names,
        wanted,
        checkpoint,
        chosen.postprocessing,
        chosen.temperature,
        False,
        chosen.bf16_accepted and checked,
        chosen.openvino_accepted and checked,
    )


def load_predictor(
    workdir: Path,
    dataset: str | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str | None = None,
    **kwargs,
) -> Predictor:
    """The predictor ``autoseg predict`` uses (:func:`choose_models`); ``kwargs`` (device, tta, step,
    precision, backend) go to every configuration's :class:`~autoseg.inference.fold_ensemble.FoldEnsemble`.
    The backend is ``predict``'s default, ``auto``, unless given: resolved here once, with the models' OpenVINO
    acceptance (:func:`autoseg.inference.backends.auto_backend`)."""
    workspace = find_dataset(workdir, dataset)
    plan = load_plan(workspace.plans)
    choice = choose_models(workspace, plan, configurations, folds, checkpoint)
    if kwargs.get("backend", "auto") == "auto":
        kwargs["backend"] = resolve_backend(
            "auto",
            resolve_device(kwargs.get("device", "auto")),
            kwargs.get("precision", "auto"),
            openvino_accepted=choice.openvino_accepted,
            torch_compile=kwargs.get("torch_compile", False),
        )
    if auto_bf16(choice, kwargs.get("precision", "auto"), kwargs.get("device", "auto"), kwargs["backend"]):
        kwargs["precision"] = "bf16"
        log.info(
            "precision auto: bf16 (this CPU has it natively and `autoseg select` found it agrees with fp32 "
            "on this model)"
        )
    members = [
        load_fold_ensemble(workspace, plan, c, choice.folds[c], choice.checkpoint, **kwargs)
        for c in choice.configurations
    ]
    return Predictor(members, choice.postprocessing, choice.temperature)


def auto_bf16(choice: ModelChoice, precision: str, device: str, backend: str) -> bool:
    """``--precision auto`` takes bf16 for the torch and openvino backends on a CPU with native bf16, for a
    model whose bf16 check in ``select`` passed; everywhere else it stays as
    :func:`autoseg.core.devices.inference_autocast` says."""
    if precision != "auto" or not choice.bf16_accepted or resolve_device(device).type != "cpu":
        return False
    if backend == "auto":
        backend = auto_backend(resolve_device(device), precision, choice.openvino_accepted)[0]
    return backend in ("torch", "openvino") and cpu_has_native_bf16()
