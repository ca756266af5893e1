"""Atomic file writes, and the human-readable JSON every metadata file uses.

Every metadata file of autoseg (fingerprint, plans, splits, logs) is JSON with a
``version`` field; writes go to a temporary file renamed into place so an interrupted
run never leaves half a file behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=_default) + "\n"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), dumps(data).encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_or_raise(path: Path, error: type[Exception], what: str = "", fix: str = "") -> Any:
    """:func:`read_json`, with a missing, unreadable or invalid file raised as ``error`` in one line:
    ``cannot read <what> <path>: <reason>; <fix>``."""
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what + ' ' if what else ''}{path}: {exc}" + (f"; {fix}" if fix else "")) from exc


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    ``suffix`` lets writers that choose a format by extension (SimpleITK) see the right one.
    """
    path = Path(path)
    ensure_folder(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Delete what :func:`atomic_path` left in ``folder`` for these final file names: the temporary
    files of a run killed while writing them (a rerun writes the files again)."""
    for name in names:
        for stale in Path(folder).glob(f".{name}.*"):
            stale.unlink(missing_ok=True)


def check_folder_path(path: Path) -> None:
    """Fail early, with a clear message, when a file stands where ``path`` or a parent folder must go."""
    for part in (Path(path), *Path(path).parents):
        if part.exists() and not part.is_dir():
            from autoseg.core.errors import WorkspaceError

            raise WorkspaceError(f"{part} is a file, not a folder; give a folder for the output")


def ensure_folder(path: Path) -> Path:
    """Create ``path`` (and its parents) as a folder; a file in the way, or no permission, is a clear error."""
    from autoseg.core.errors import WorkspaceError

    check_folder_path(path)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create folder {path}: {exc.strerror or exc}") from exc
    return Path(path)


def ensure_writable_folder(path: Path) -> Path:
    """:func:`ensure_folder`, then write and remove a probe file there.

    A real write, not a permission check: it also fails on read-only mounts and full disks,
    and it holds for root, whom permission bits do not stop. Call it before long work whose
    results go to ``path``, so that the work is not done in vain.
    """
    from autoseg.core.errors import WorkspaceError

    folder = ensure_folder(path)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".autoseg-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WorkspaceError(f"cannot write to folder {folder}: {exc.strerror or exc}") from exc
    return folder


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
