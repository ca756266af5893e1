"""Paths and files of the work folder.

Everything a dataset produces lives under ``<workdir>/<dataset>/``::

    dataset.json  fingerprint.json  plans.json  splits.json  inference.json
    preprocessed/<data_identifier>/  models/<config>/fold_<k>/  tuning/

The work folder comes from ``--workdir``; without it, ``AUTOSEG_HOME`` or else
``./autoseg_work``. No other environment variable is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import WorkspaceError

DEFAULT_WORKDIR = "autoseg_work"


def default_workdir() -> Path:
    return Path(os.environ.get("AUTOSEG_HOME") or DEFAULT_WORKDIR)


@dataclass(frozen=True)
class DatasetWorkspace:
    """The files of one dataset inside the work folder."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    def preprocessed(self, data_identifier: str) -> Path:
        return self.root / "preprocessed" / data_identifier

    def model(self, configuration: str, fold: int | str) -> Path:
        return self.root / "models" / configuration / f"fold_{fold}"

    @property
    def inference(self) -> Path:
        """``inference.json``: what ``autoseg select`` chose and ``autoseg predict`` follows."""
        return self.root / "inference.json"

    @property
    def tuning(self) -> Path:
        return self.root / "tuning"


def dataset_workspace(workdir: Path, name: str) -> DatasetWorkspace:
    return DatasetWorkspace(Path(workdir).expanduser().resolve() / name)


def find_dataset(workdir: Path, name: str | None = None) -> DatasetWorkspace:
    """The planned dataset named ``name``, or the only one in the work folder."""
    workdir = Path(workdir).expanduser().resolve()
    planned = sorted(p.parent.name for p in workdir.glob("*/plans.json")) if workdir.is_dir() else []
    if name is not None:
        if name not in planned:
            known = ", ".join(planned) or "none"
            raise WorkspaceError(f"dataset {name!r} is not planned in {workdir} (planned: {known}); run `autoseg plan`")
        return dataset_workspace(workdir, name)
    if not planned:
        raise WorkspaceError(f"no planned dataset in {workdir}; run `autoseg plan -d DATASET_DIR -w {workdir}` first")
    if len(planned) > 1:
        raise WorkspaceError(f"{workdir} holds several datasets ({', '.join(planned)}); choose one with -d NAME")
    return dataset_workspace(workdir, planned[0])
