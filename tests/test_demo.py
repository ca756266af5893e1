"""`autoseg demo`: a reduced run of the real workflow must segment the phantom tumours well."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from autoseg.commands import demo


def test_demo_options_reach_the_library(tmp_path, run_cli, monkeypatch):
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return demo.DemoResult(
            tmp_path,
            demo.CPU_BUDGET,
            "cpu",
            {"WT": 0.9},
            {"train_s": 60.0},
            tmp_path / "overview.png",
            tmp_path / "predictions" / "report.html",
        )

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    result = run_cli("demo", "-o", tmp_path, "--cases", "7", "--epochs", "2", "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.output
    assert seen["output"] == tmp_path and seen["cases"] == 7 and seen["epochs"] == 2 and seen["device"] == "cpu"
    assert seen["iterations"] is None and seen["held_out"] is None  # the device's default budget
    assert "WT" in result.output and "0.900" in result.output
    assert result.output.rstrip().endswith(str(tmp_path / "predictions" / "report.html"))  # the demo ends on its page
    assert run_cli("demo", "--cases", "3").exit_code == 2  # five folds need five cases


def test_default_budget_is_bigger_on_cuda():
    cpu, cuda = demo.default_budget("cpu"), demo.default_budget("cuda")
    assert cuda.cases > cpu.cases and cuda.epochs * cuda.iterations > cpu.epochs * cpu.iterations
    assert demo.default_budget("mps") == cpu


@pytest.mark.slow
def test_reduced_demo_segments_the_tumour(tmp_path):
    said = []
    result = demo.run_demo(
        output=tmp_path,
        cases=6,
        held_out=2,
        epochs=4,
        iterations=15,
        shape=(32, 40, 32),
        device="cpu",
        show_progress=False,
        say=said.append,
    )
    steps = "\n".join(said)
    for command in ("autoseg plan -d", "autoseg train -w", "autoseg predict -w", "autoseg evaluate -p"):
        assert command in steps
    # Chance level: calling the whole head tumour scores WT Dice 0.11 on average (0.04-0.26) on these phantoms.
    # Measured with this budget: WT 0.96, TC 0.85, edema 0.92 (ET 0.41: one of the two cases has none, so any
    # enhancing voxel predicted there scores 0). The thresholds leave a wide margin for other CPUs and torch versions.
    assert result.dice["WT"] > 0.75, result.dice
    assert result.dice["edema"] > 0.6 and result.dice["TC"] > 0.5, result.dice
    picture = matplotlib.image.imread(result.overview)
    assert picture.shape[1] > picture.shape[0] > 200  # 2 held-out rows × 8 panels beside the curves
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["version"] == 1 and record["budget"]["cases"] == 6 and record["dice"] == result.dice
    assert sorted((tmp_path / "predictions").glob("*.nii.gz")) and (tmp_path / "predictions" / "summary.json").is_file()
    assert result.page == tmp_path / "predictions" / "report.html" and result.page.stat().st_size > 1000
