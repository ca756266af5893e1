"""``autoseg import``: install a model into a work folder: an archive of ``autoseg export``
(:func:`autoseg.deploy.archive.import_model`), or a model trained by nnU-Net v2, its results folder or the zip of
``nnUNetv2_export_model_to_zip`` (:func:`autoseg.deploy.nnunet.import_nnunet`).

Named ``import_`` because ``import`` is a Python keyword (``from autoseg.commands.import import ...`` would not
parse)."""

from __future__ import annotations

from pathlib import Path

from autoseg.core.errors import WorkspaceError
from autoseg.deploy.archive import import_model
from autoseg.deploy.nnunet import import_nnunet, is_nnunet_model


def import_archive(*, archive: Path, workdir: Path, overwrite: bool = False) -> str:
    """Install ``archive``; returns the line ``import`` prints."""
    archive = Path(archive).expanduser()
    if is_nnunet_model(archive):
        workspace = import_nnunet(source=archive, workdir=workdir, overwrite=overwrite)
        return f"imported nnU-Net model {workspace.name} into {workspace.root}"
    if archive.is_dir():
        raise WorkspaceError(
            f"{archive} is neither an nnU-Net v2 results folder (Trainer__Plans__configuration with plans.json) "
            "nor a model archive"
        )
    workspace = import_model(archive=archive, workdir=workdir, overwrite=overwrite)
    return f"imported {workspace.name} into {workspace.root}"
