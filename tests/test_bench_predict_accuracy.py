"""benchmarks/bench_predict_accuracy.py's setting names: what each one runs, and bad names refused by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_predict_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_predict_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(
    "name, options",
    [
        (
            "torch-fp32-8-0.5",
            {
                "backend": "torch",
                "precision": "fp32",
                "step": 0.5,
                "tta": True,
                "mirror_axes": (0, 1, 2),
                "torch_compile": False,
            },
        ),
        (
            "openvino-int8-none-0.75",
            {
                "backend": "openvino",
                "precision": "int8",
                "step": 0.75,
                "tta": False,
                "mirror_axes": None,
                "torch_compile": False,
            },
        ),
        (
            "openvino-bf16-4-0.5",
            {
                "backend": "openvino",
                "precision": "bf16",
                "step": 0.5,
                "tta": True,
                "mirror_axes": (0, 1),
                "torch_compile": False,
            },
        ),
        (
            "torch-bf16-adaptive-0.9-0.75",
            {
                "backend": "torch",
                "precision": "bf16",
                "step": 0.75,
                "mirror_axes": (0, 1, 2),
                "adaptive_tta": 0.9,
                "torch_compile": False,
            },
        ),
        (
            "compiled-bf16-8-0.5",
            {
                "backend": "torch",
                "precision": "bf16",
                "step": 0.5,
                "tta": True,
                "mirror_axes": (0, 1, 2),
                "torch_compile": True,
            },
        ),
    ],
)
def test_setting_names_give_the_predictor_options(bench, name, options):
    setting = bench.Setting.parse(name)
    assert setting.predictor_options() == options
    assert setting.name == name


@pytest.mark.parametrize(
    "name, says",
    [
        ("torch-fp32-8", "expected <backend>-<precision>-<tta>-<step>"),
        ("onnx-fp32-8-0.5", "backend 'onnx'"),
        ("torch-int8-8-0.5", "int8 with openvino only"),
        ("torch-fp16-8-0.5", "precision 'fp16'"),
        ("torch-fp32-3-0.5", "TTA '3'"),
        ("torch-fp32-adaptive-x-0.5", "TTA 'adaptive-x'"),
        ("torch-fp32-8-half", "step 'half'"),
        ("torch-fp32-8-1.5", "not in (0, 1]"),
    ],
)
def test_bad_setting_names_are_refused_by_name(bench, name, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.arguments(["--settings", name])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_the_reference_runs_first_and_once_and_the_default_is_the_torch_grid(bench):
    chosen = bench.arguments(["--settings", "openvino-bf16-8-0.5", "torch-fp32-8-0.5", "openvino-bf16-8-0.5"]).chosen
    assert [s.name for s in chosen] == ["torch-fp32-8-0.5", "openvino-bf16-8-0.5"]
    grid = bench.arguments([]).chosen
    assert grid[0] == bench.REFERENCE and len(grid) == len(set(grid)) == 2 * 5 * 2
    assert {s.backend for s in grid} == {"torch"} and "torch-bf16-adaptive-0.9-0.75" in {s.name for s in grid}
