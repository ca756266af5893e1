"""Probe: is INT8 post-training quantisation worth building for CPU prediction on this machine?

Exports the Task01 reference plan's ``3d_fullres`` network (random weights, no deep supervision)
to ONNX and quantises it as ``autoseg export --int8`` does (``autoseg.inference.onnx_export`` and
``autoseg.deploy.int8.quantise``: ONNX Runtime static quantisation, QDQ, per-channel int8
weights, uint8 activations, the first and last convolutions left in float), calibrated on
``--calibration`` random patches (random weights and inputs are enough for speed, not for
accuracy), and times one forward pass of one tile of the plan's patch (128^3) for:

* ONNX Runtime fp32 and ONNX Runtime INT8 (CPU execution provider);
* OpenVINO fp32, bf16 (inference-precision hint) and the same INT8 model, when openvino is installed;
* torch fp32 and torch bf16 autocast, eager (what ``autoseg predict`` runs) and compiled (``predict
  --compile``; the compilation's seconds apart).

Each figure is the best of ``--repeats`` timed runs after one warm-up, ``--threads`` threads.
Prints ONE JSON object. Run it on a quiet machine (it times):

    python benchmarks/bench_int8.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from autoseg.core.plan import load_plan
from autoseg.deploy.int8 import quantise
from autoseg.inference.compiled import CompiledNetwork
from autoseg.inference.onnx_export import INPUT_NAME, export_onnx
from autoseg.model.network import build_network

REPO = Path(__file__).resolve().parents[1]
TASK01 = REPO / "plans" / "Task01_BrainTumour" / "plans.json"


def best_of(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def onnxruntime_times(models: dict[str, Path], x: np.ndarray, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    out = {}
    for name, path in models.items():
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[f"onnxruntime_{name}"] = best_of(lambda s=session: s.run(None, {INPUT_NAME: x}), repeats)
    return out


def openvino_times(models: dict[str, Path], x: np.ndarray, threads: int, repeats: int) -> dict:
    try:
        import openvino as ov
    except ImportError:
        return {"openvino": "not installed"}
    core, out = ov.Core(), {}
    for name, path, hint in (
        ("fp32", models["fp32"], "f32"),
        ("bf16", models["fp32"], "bf16"),
        ("int8", models["int8"], "f32"),
    ):
        request = core.compile_model(
            str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        ).create_infer_request()
        out[f"openvino_{name}"] = best_of(lambda r=request: r.infer({0: x}), repeats)
    return out


def torch_times(network: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    """Eager, and compiled as ``predict --compile`` does (the compilation, at construction, is timed apart)."""
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out[f"torch_{name}"] = best_of(lambda: network(x), repeats)
            start = time.perf_counter()
            compiled = CompiledNetwork(network, torch.zeros_like(x), dtype, f"torch {name}")
            out[f"torch_compile_{name}_s"] = round(time.perf_counter() - start, 1)
            out[f"torch_compiled_{name}"] = best_of(lambda compiled=compiled: compiled(x), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=4, help="random patches to calibrate INT8 on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = load_plan(TASK01)
    config = plan.configuration("3d_fullres")
    network = build_network(config, len(plan.channel_names), plan.num_classes, deep_supervision=False).eval()
    x = torch.randn(1, len(plan.channel_names), *config.patch_size)  # the exported model's fixed patch
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        models = {"fp32": Path(scratch) / "fp32.onnx", "int8": Path(scratch) / "int8.onnx"}
        models["fp32"].write_bytes(export_onnx(network.state_dict(), config, len(plan.channel_names), plan.num_classes))
        tiles = [rng.standard_normal(tuple(x.shape), dtype=np.float32) for _ in range(args.calibration)]
        models["int8"].write_bytes(quantise(models["fp32"].read_bytes(), tiles))
        seconds = {
            **torch_times(network, x, args.repeats),
            **onnxruntime_times(models, x.numpy(), args.threads, args.repeats),
            **openvino_times(models, x.numpy(), args.threads, args.repeats),
        }
    reference = seconds["torch_bf16"]  # eager, as predict runs it by default
    print(
        json.dumps(
            {
                "benchmark": "int8_probe",
                "patch": config.patch_size,
                "threads": args.threads,
                "seconds_per_pass": seconds,
                "speed_vs_torch_bf16": {
                    k: round(reference / v, 2)
                    for k, v in seconds.items()
                    if isinstance(v, float) and not k.endswith("_s")
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
