"""One error family for everything a user can get wrong.

The CLI turns an :class:`AutosegError` into a readable message and exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator


class AutosegError(Exception):
    """Base class for errors caused by input, not by a bug in autoseg."""


class DatasetError(AutosegError):
    """The dataset folder or one of its cases is unusable.

    ``problems`` lists one message per bad case so that a user fixes them all in one go.
    """

    def __init__(self, problems: list[str] | str, header: str = "The dataset has problems") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        lines = [f"{header} ({len(self.problems)}):"] + [f"  - {p}" for p in self.problems]
        super().__init__(self.problems[0] if len(self.problems) == 1 else "\n".join(lines))


class PlanError(AutosegError):
    """A plan or fingerprint file is missing, malformed or inconsistent."""


class WorkspaceError(AutosegError):
    """The work folder does not hold what a command needs."""


class DeviceError(AutosegError):
    """The requested device or precision does not exist on this machine."""


class CheckpointError(AutosegError):
    """A checkpoint is missing, unreadable or from an incompatible version."""


class OptionError(AutosegError):
    """Command options that contradict each other or take no such value; the CLI reports it as a usage
    error (exit code 2) on ``option``."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


class MissingExtraError(AutosegError):
    """An optional feature needs a package of an extra that is not installed (``pip install autoseg[onnx]``)."""


#: errno values that mean the disk, not the input or autoseg, stopped the run.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
#: How storage failures read when a library reports them without an errno (SQLite through SQLAlchemy).
STORAGE_MESSAGES = ("database or disk is full", "readonly database", "disk i/o error")
#: numpy reports a short write (a full disk) as an OSError without errno: "9216 requested and 7136 written".
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


#: What stops every later write to the same disk, not only this one (a file without permission does not).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def out_of_disk(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full or read-only disk: a run that writes case after
    case should stop there with :func:`storage_failure`'s line rather than fail every later case."""
    return any(
        isinstance(e, OSError) and (e.errno in DISK_ERRNOS or SHORT_WRITE.search(str(e).lower())) for e in _causes(exc)
    )


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then what caused it, and so on (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_failure(exc: BaseException) -> str | None:
    """One line when ``exc`` (or what caused it) is a full, read-only or forbidden disk, else None.

    Such a failure is the machine's, not a bug: the user frees space or fixes permissions and runs
    the same command again, which resumes (every file autoseg writes is written atomically).
    """
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            where = f" {cause.filename}" if cause.filename else ""
            return f"cannot write{where}: {cause.strerror or errno.errorcode.get(cause.errno, cause.errno)}"
        text = str(cause).lower()
        if isinstance(cause, OSError) and SHORT_WRITE.search(text):  # numpy's tofile/save on a full disk
            return f"cannot write: the disk is full ({str(cause)})"
        if any(m in text for m in STORAGE_MESSAGES):
            return f"the database cannot be written: {str(cause).splitlines()[0]}"
    return None
