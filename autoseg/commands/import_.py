"""``autoseg import``: install an exported model into a work folder (:func:`autoseg.deploy.archive.import_model`).

Named ``import_`` because ``import`` is a Python keyword (``from autoseg.commands.import import ...`` would not
parse)."""

from __future__ import annotations

from pathlib import Path

from autoseg.deploy.archive import import_model


def import_archive(*, archive: Path, workdir: Path, overwrite: bool = False) -> str:
    """Install ``archive``; returns the line ``import`` prints."""
    workspace = import_model(archive=archive, workdir=workdir, overwrite=overwrite)
    return f"imported {workspace.name} into {workspace.root}"
