"""benchmarks/gpu_check.py cannot rot: its tiny CPU run goes through every part but NCCL DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu_and_reports_every_part():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu"],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["tiny"] is True and "say nothing about GPU speed" in report["note"]
    assert [r["compile"] for r in report["train_network"]] == ["off", "eager"]
    assert all(r["iterations_per_s"] > 0 and r["parameters"] > 0 for r in report["train_network"])
    assert [r["workers"] for r in report["train_loader"]] == [1, 2]
    assert all(r["iterations_per_s"] > 0 and isinstance(r["loader_bound"], bool) for r in report["train_loader"])
    predicted = report["predict"]
    assert predicted["folds"] == 5 and predicted["mirrors"] == 8 and predicted["seconds"] > 0
    assert report["ddp"] == {"gpus": 0, "skipped": "one GPU or none"}
