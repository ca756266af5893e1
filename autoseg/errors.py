"""One error family for everything a user can get wrong.

The CLI turns an :class:`AutosegError` into a readable message and exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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


class CheckpointError(AutosegError):
    """A checkpoint is missing, unreadable or from an incompatible version."""


class MissingExtraError(AutosegError):
    """An optional feature needs a package of an extra that is not installed (``pip install autoseg[onnx]``)."""
