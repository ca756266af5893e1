"""The test suite's own guards: a misspelt marker is an error, a hanging test times out, and the declared
minimum versions are pinned in .ci/min-versions.txt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_a_misspelt_marker_is_an_error_and_tests_have_a_timeout(tmp_path):
    (tmp_path / "test_typo.py").write_text("import pytest\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pyproject.toml"), "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "'slwo' not found in `markers`" in result.stdout + result.stderr
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(options["timeout"]) >= 600


def test_the_minimum_versions_pin_every_declared_floor():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    floors = {d.split(">=")[0].strip().lower(): d.split(">=")[1].strip() for d in declared if ">=" in d}
    lines = (REPO / ".ci" / "min-versions.txt").read_text().splitlines()
    pinned = {
        line.split("==")[0].strip().lower(): line.split("==")[1].strip()
        for line in lines
        if "==" in line and not line.startswith("#")
    }
    for name, floor in floors.items():
        assert name in pinned, f"{name} has no pin in .ci/min-versions.txt"
        pin, low = (tuple(map(int, v.split("."))) for v in (pinned[name], floor))
        assert pin[: len(low)] == low, f"{name}: pinned {pinned[name]}, declared >={floor}"
