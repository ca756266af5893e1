"""Cross-validation splits, identical to nnU-Net's so folds compare one-to-one.

Five folds over the sorted case ids, shuffled with ``RandomState(12345)`` and cut into
consecutive chunks (the scheme of scikit-learn's ``KFold(shuffle=True)``); each fold's
train and validation lists are sorted. A ``splits_final.json`` shipped in the dataset
folder is used instead when present.

Once written, splits are stable: planning again after cases were added or removed keeps
every remaining case in its fold and gives each new case to the fold with the fewest
validation cases, so no case a trained fold learned from ever becomes its validation case.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.core.errors import DatasetError, WorkspaceError
from autoseg.core.files import read_json

SPLITS_VERSION = 1
SPLIT_SEED = 12345
DEFAULT_FOLDS = 5


def kfold_splits(case_ids: Sequence[str], n_folds: int = DEFAULT_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    """``n_folds`` folds (as many as cases when there are fewer); none for one case: a fold whose
    validation case is its own training case would report a Dice that measures nothing."""
    ids = sorted(case_ids)
    n = len(ids)
    n_folds = min(n_folds, n)
    if n_folds < 2:
        return []
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = [n // n_folds + (1 if k < n % n_folds else 0) for k in range(n_folds)]
    folds, start = [], 0
    for size in sizes:
        val = set(order[start : start + size].tolist())
        start += size
        folds.append(
            {"train": [ids[i] for i in range(n) if i not in val], "val": [ids[i] for i in range(n) if i in val]}
        )
    return folds


def updated_splits(document: dict, case_ids: Sequence[str]) -> tuple[dict, list[str], list[str]]:
    """(``document`` with removed cases dropped and new ones added, added ids, removed ids)."""
    folds = document["folds"]
    known = {c for f in folds for c in (*f["train"], *f["val"])}
    added, removed = sorted(set(case_ids) - known), sorted(known - set(case_ids))
    if not added and not removed:
        return document, [], []
    present = set(case_ids)
    val = [[c for c in f["val"] if c in present] for f in folds]
    for case in added:
        min(val, key=len).append(case)  # first of the smallest: deterministic
    every = sorted(present)
    folds = [{"train": [c for c in every if c not in held_out], "val": sorted(held_out)} for held_out in map(set, val)]
    return {**document, "folds": folds}, added, removed


def fold_problems(folds: object) -> list[str]:
    """Why ``folds`` cannot be cross-validation folds: each needs train and validation case lists,
    a validation case at least, and no case in both (its Dice would be measured on training data)."""
    if not isinstance(folds, list):
        return ["the folds must be a list of {'train': [...], 'val': [...]}"]
    problems = []
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(key), list) for key in ("train", "val")):
            problems.append(f"fold {k} must be {{'train': [...], 'val': [...]}}")
        elif not fold["val"]:
            problems.append(f"fold {k} has no validation case")
        elif shared := sorted(set(fold["train"]) & set(fold["val"])):
            problems.append(f"fold {k} validates on case(s) it trains on: {', '.join(map(str, shared[:5]))}")
    return problems


def read_splits(path: Path, dataset: str) -> list[dict]:
    """The folds of a planned dataset; a missing file or a fold that cannot exist is a clear error."""
    if not Path(path).is_file():
        raise WorkspaceError(
            f"dataset {dataset} has no splits.json, so it cannot be trained or validated here "
            "(an imported model holds no training data); run `autoseg plan -d <dataset folder>` first"
        )
    folds = read_json(path).get("folds")
    problems = fold_problems(folds)
    if problems:
        raise WorkspaceError(f"{path}: {'; '.join(problems)}; run `autoseg plan` again to make new splits")
    return folds


def fold_cases(folds: list[dict], fold: str, dataset: str) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of fold ``fold``: a number, or ``all`` (every case, both ways)."""
    if fold == "all":
        every = sorted({c for f in folds for c in (*f["train"], *f["val"])})
        return every, every
    if not str(fold).isdigit():
        raise WorkspaceError(f"fold must be a number 0..{len(folds) - 1} or 'all', not {fold!r}")
    if not folds:
        raise WorkspaceError(
            f"dataset {dataset} has too few cases for cross-validation, so it has no fold "
            f"{fold}; train with --fold all (it validates on its own training case)"
        )
    k = int(fold)
    if not 0 <= k < len(folds):
        raise WorkspaceError(f"fold {k} does not exist; splits.json has folds 0..{len(folds) - 1} (or 'all')")
    return folds[k]["train"], folds[k]["val"]


def splits_document(case_ids: Sequence[str], dataset_dir: Path) -> dict:
    """The splits to store: the dataset's own ``splits_final.json`` if it has one, else k-fold."""
    shipped = Path(dataset_dir) / "splits_final.json"
    if shipped.is_file():
        folds = read_json(shipped)
        problems = fold_problems(folds)
        if problems:
            raise DatasetError([f"splits_final.json: {p}" for p in problems])
        known = set(case_ids)
        bad = sorted({c for f in folds for c in (*f["train"], *f["val"]) if c not in known})
        if bad:
            raise DatasetError(f"splits_final.json names unknown case(s) {bad[:5]}")
        source = "splits_final.json"
    else:
        folds, source = kfold_splits(case_ids), f"kfold(seed={SPLIT_SEED})"
    return {"version": SPLITS_VERSION, "source": source, "folds": folds}
