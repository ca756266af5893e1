"""Paths and files of the work folder.

Everything a dataset produces lives under ``<workdir>/<dataset>/``::

    dataset.json  fingerprint.json  plans.json  splits.json  inference.json
    preprocessed/<data_identifier>/  models/<config>/fold_<k>/  tuning/
    models/<config>/fold_<k>/next_stage/<data_identifier>/<case>.npy   (a cascade stage's training input)

The work folder comes from ``--workdir``; without it, ``./autoseg_work``. No environment variable is
read as a setting: every path comes from the command line (an ``AUTOSEG_HOME`` left from older versions
is named in a warning, never followed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from autoseg.core.errors import WorkspaceError

log = logging.getLogger(__name__)
DEFAULT_WORKDIR = "autoseg_work"
#: The checkpoints a trained fold keeps: ``checkpoint_<name>.pt``.
CHECKPOINTS = ("final", "best", "latest")


def default_workdir() -> Path:
    """``./autoseg_work``: what a command without ``--workdir`` uses."""
    if os.environ.get("AUTOSEG_HOME"):
        log.warning(
            "AUTOSEG_HOME is not read (every path comes from the command line): using ./%s; pass -w to "
            "use another work folder",
            DEFAULT_WORKDIR,
        )
    return Path(DEFAULT_WORKDIR)


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

    def checkpoint(self, configuration: str, fold: int | str, name: str = "final") -> Path:
        if name not in CHECKPOINTS:
            raise WorkspaceError(f"unknown checkpoint {name!r}; choose {', '.join(CHECKPOINTS)}")
        return self.model(configuration, fold) / f"checkpoint_{name}.pt"

    def next_stage(self, configuration: str, fold: int | str, data_identifier: str) -> Path:
        """Where fold ``fold`` of ``configuration`` leaves its validation masks for the cascade stages that read
        it: ``<case>.npy``, labels on the stages' preprocessed grid ``data_identifier`` (nnU-Net's
        ``predicted_next_stage``)."""
        return self.model(configuration, fold) / "next_stage" / data_identifier

    def trained_folds(self, configuration: str, checkpoint: str = "final") -> list[str]:
        """The folds of ``configuration`` that have ``checkpoint``: the numbered ones (cross-validation), or
        ``all`` when only the model trained on every case exists (it has seen every case, so it joins no
        cross-validation ensemble)."""
        root = self.root / "models" / configuration
        trained = [
            p.name.removeprefix("fold_") for p in root.glob("fold_*") if (p / f"checkpoint_{checkpoint}.pt").is_file()
        ]
        numbered = sorted((f for f in trained if f.isdigit()), key=int)
        return numbered or (["all"] if "all" in trained else [])

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
