"""Pool a configuration's cross-validation predictions: every training case once, from the fold that held it out.

Full-volume validation (end of ``autoseg train``, or ``--validate-only``) leaves
``models/<config>/fold_<k>/validation/<case>.npz`` with the class probabilities on the input
grid. A configuration is complete when its folds' validation cases cover the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Plan
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.preprocessing.restore import class_names


@dataclass(frozen=True)
class CrossValidation:
    """Where the pooled probabilities of one configuration are."""

    configuration: str
    folds: tuple[int, ...]
    probabilities: dict[str, Path]  # case id -> <case>.npz


def pool(
    workspace: DatasetWorkspace, configuration: str, splits: list[dict], case_ids: list[str]
) -> tuple[CrossValidation | None, list[str]]:
    """The pooled predictions of ``configuration``, or None and one line per missing part with its fix."""
    problems, files = [], {}
    listed = {c for fold in splits for c in fold["val"]}
    for k, fold in enumerate(splits):
        folder = workspace.model(configuration, k) / "validation"
        if not (folder / "summary.json").is_file():
            problems.append(
                f"{configuration} fold {k} is not validated (no {folder / 'summary.json'}): "
                f"run `autoseg train -c {configuration} -f {k}`, or add --validate-only if it is trained"
            )
            continue
        missing = [c for c in fold["val"] if not (folder / f"{c}.npz").is_file()]
        if missing:
            problems.append(
                f"{configuration} fold {k} has no probabilities for {_some(missing)} in {folder}: "
                f"run `autoseg train -c {configuration} -f {k} --validate-only`"
            )
        for case_id in fold["val"]:
            files.setdefault(case_id, folder / f"{case_id}.npz")
    uncovered = [c for c in case_ids if c not in listed]  # cases of unvalidated folds are reported above
    if uncovered:
        problems.append(f"{configuration}: case(s) {_some(uncovered)} are in no fold's validation set of splits.json")
    if problems:
        return None, problems
    return CrossValidation(configuration, tuple(range(len(splits))), {c: files[c] for c in case_ids}), []


def load_probabilities(path: Path, plan: Plan, shape: tuple[int, ...], case_id: str) -> np.ndarray:
    """float16 ``(K, z, y, x)`` probabilities of one case, checked against the plan's classes and the label's grid."""
    try:
        with np.load(path) as saved:
            probabilities, classes = saved["probabilities"], [str(c) for c in saved["classes"]]
    except (OSError, ValueError, KeyError) as exc:
        raise WorkspaceError(
            f"case {case_id}: cannot read {path}: {exc}; validate that fold again (`autoseg train --validate-only`)"
        ) from exc
    if classes != class_names(plan):
        raise WorkspaceError(
            f"case {case_id}: {path} holds classes {classes}, the plan has {class_names(plan)}; "
            "validate that fold again (`autoseg train --validate-only`)"
        )
    if tuple(probabilities.shape[1:]) != tuple(shape):
        raise WorkspaceError(
            f"case {case_id}: {path} has shape {tuple(probabilities.shape[1:])}, its label "
            f"{tuple(shape)}; validate that fold again (`autoseg train --validate-only`)"
        )
    return probabilities


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")
