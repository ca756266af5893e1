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

from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.errors import DatasetError
from autoseg.jsonio import read_json

SPLITS_VERSION = 1
SPLIT_SEED = 12345
DEFAULT_FOLDS = 5


def kfold_splits(case_ids: Sequence[str], n_folds: int = DEFAULT_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    ids = sorted(case_ids)
    n = len(ids)
    n_folds = min(n_folds, n)
    if n_folds < 2:
        return [{"train": ids, "val": ids}]
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = [n // n_folds + (1 if k < n % n_folds else 0) for k in range(n_folds)]
    folds, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        folds.append({"train": [ids[i] for i in range(n) if i not in val],
                      "val": [ids[i] for i in range(n) if i in val]})
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


def read_splits(path: Path, dataset: str) -> list[dict]:
    """The folds of a planned dataset; a missing file is a clear error (an imported model has none)."""
    if not Path(path).is_file():
        from autoseg.errors import WorkspaceError

        raise WorkspaceError(f"dataset {dataset} has no splits.json, so it cannot be trained or validated here "
                             "(an imported model holds no training data); run `autoseg plan -d <dataset folder>` first")
    return read_json(path)["folds"]


def splits_document(case_ids: Sequence[str], dataset_dir: Path) -> dict:
    """The splits to store: the dataset's own ``splits_final.json`` if it has one, else k-fold."""
    shipped = Path(dataset_dir) / "splits_final.json"
    if shipped.is_file():
        folds = read_json(shipped)
        known = set(case_ids)
        bad = sorted({c for f in folds for c in (*f.get("train", []), *f.get("val", [])) if c not in known})
        if bad:
            raise DatasetError(f"splits_final.json names unknown case(s) {bad[:5]}")
        source = "splits_final.json"
    else:
        folds, source = kfold_splits(case_ids), f"kfold(seed={SPLIT_SEED})"
    return {"version": SPLITS_VERSION, "source": source, "folds": folds}
