"""Every command's --help reads in an 80-column terminal: each option name whole, no line wider than 80."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from autoseg.cli import app

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_reads_at_80_columns(name):
    args = [name, "--help"] if name else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    wide = [line for line in result.output.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)
    command = GROUP.commands[name] if name else GROUP
    for param in command.params:
        # an option, by duck type: typer >= 0.26 carries its own copy of click, older ones use click's
        if getattr(param, "param_type_name", "") == "option" and not getattr(param, "hidden", False):
            for option in (*param.opts, *param.secondary_opts):
                assert f"{option}" in result.output, f"{option} is not whole in `{name} --help`"
    if name:
        assert "…" not in result.output  # nothing cut short
