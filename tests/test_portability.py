"""autoseg starts where POSIX-only modules are missing (Windows): no command may need ``fcntl`` to import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Blocks the POSIX-only modules as Windows lacks them, then imports every module of autoseg,
#: runs the CLI (every command's help and ``info``), and takes and releases the fold lock.
_SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    from pathlib import Path

    class NoPosix:
        def find_spec(self, name, path=None, target=None):
            if name in ("fcntl", "resource"):
                raise ImportError(f"No module named {name!r} (blocked as on Windows)")
            return None

    for name in ("fcntl", "resource"):
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, NoPosix())

    import autoseg
    for module in pkgutil.walk_packages(autoseg.__path__, "autoseg."):
        importlib.import_module(module.name)

    from typer.testing import CliRunner
    from autoseg.cli import app

    runner = CliRunner()
    folder = Path(sys.argv[1])
    result = runner.invoke(app, ["info", "--workdir", str(folder)])
    assert result.exit_code == 0, result.output
    for command in app.registered_commands:
        name = command.name or command.callback.__name__.replace("_", "-")
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)

    from autoseg.core.processes import hold_lock, lock_exclusive, lock_holder
    lock = lock_exclusive(folder / ".lock", "process 1")
    assert lock is not None and lock_holder(folder / ".lock") == "process 1"
    lock.close()
    with hold_lock(folder / "other.lock"):
        pass
    assert "fcntl" not in sys.modules or sys.modules["fcntl"] is None
    print("ok")
    """
)


def test_every_command_runs_without_fcntl(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
