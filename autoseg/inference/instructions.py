"""``inference.json``: the model and post-processing ``autoseg select`` chose, which ``autoseg predict`` follows.

Only the keys prediction needs are read back (configurations, folds, checkpoint,
post-processing, the calibration temperature, whether bf16 and OpenVINO were accepted); the scores that justified
them are kept in the same file for people. Keys are added within a version when an older file, without them,
keeps its meaning: a missing ``bf16`` or ``openvino`` entry means not accepted (torch fp32, as before the check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.core.errors import PlanError
from autoseg.core.files import read_json_or_raise
from autoseg.core.workspace import CHECKPOINTS
from autoseg.data.evaluation.postprocessing import Step, step_from_json

INFERENCE_VERSION = 1
FIX = "run `autoseg select` again, or pass -c/--folds to predict without it"


@dataclass(frozen=True)
class InferenceInstructions:
    """What to predict with: every listed configuration's folds, averaged, then the post-processing steps."""

    configurations: tuple[str, ...]
    folds: dict[str, tuple[int, ...]]
    checkpoint: str
    postprocessing: tuple[Step, ...]
    #: divides the log-probabilities of the averaged output (1: as trained); see :mod:`autoseg.data.qc.calibration`.
    temperature: float = 1.0
    #: ``select`` found bf16's classes equal to fp32's on this model (see :mod:`autoseg.selection.precision`)
    bf16_accepted: bool = False
    #: ``select`` found OpenVINO's fp32 classes equal to torch's on this model (the same module)
    openvino_accepted: bool = False


def read_instructions(path: Path) -> InferenceInstructions:
    """Load and check ``inference.json``; a bad file is a PlanError naming the key and the fix."""
    return instructions_from_json(read_json_or_raise(path, PlanError, fix=FIX), str(path))


def instructions_from_json(data: Any, path: str) -> InferenceInstructions:
    """Check an ``inference.json`` document; ``path`` names it in the messages."""
    if not isinstance(data, dict) or data.get("version") != INFERENCE_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise PlanError(f"{path}: version {version!r} is not supported (expected {INFERENCE_VERSION}); {FIX}")
    missing = [k for k in ("configurations", "folds", "checkpoint", "postprocessing") if k not in data]
    if missing:
        raise PlanError(f"{path}: missing key(s) {missing}; {FIX}")
    configurations = tuple(_strings(data["configurations"], f"{path}: configurations"))
    if not configurations:
        raise PlanError(f"{path}: configurations is empty; {FIX}")
    folds = data["folds"]
    if not isinstance(folds, dict) or set(folds) != set(configurations):
        raise PlanError(f"{path}: folds must list the folds of every configuration {list(configurations)}; {FIX}")
    if data["checkpoint"] not in CHECKPOINTS:
        raise PlanError(f"{path}: checkpoint {data['checkpoint']!r} is not one of {', '.join(CHECKPOINTS)}; {FIX}")
    steps = data["postprocessing"]
    if not isinstance(steps, list):
        raise PlanError(f"{path}: postprocessing must be a list of steps; {FIX}")
    return InferenceInstructions(
        configurations=configurations,
        folds={c: tuple(_ints(folds[c], f"{path}: folds.{c}")) for c in configurations},
        checkpoint=data["checkpoint"],
        postprocessing=tuple(step_from_json(s, f"{path}: postprocessing[{i}]") for i, s in enumerate(steps)),
        temperature=_temperature(data.get("calibration"), f"{path}: calibration.temperature"),
        bf16_accepted=_accepted(data.get("bf16")),
        openvino_accepted=_accepted(data.get("openvino")),
    )


def _accepted(check: Any) -> bool:
    """A check's verdict: anything but ``{"accepted": true, ...}`` (a missing entry included) is a refusal."""
    return isinstance(check, dict) and check.get("accepted") is True


def _temperature(calibration: Any, where: str) -> float:
    """The fitted temperature; 1 when select fitted none (no case with any structure)."""
    if calibration is None:
        return 1.0
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise PlanError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlanError(f"{where} must be a list of names, got {value!r}")
    return value


def _ints(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise PlanError(f"{where} must be a non-empty list of fold numbers, got {value!r}")
    return value
