"""Probe: is INT8 post-training quantisation worth building for CPU prediction on this machine?

Exports the Task01 reference plan's ``3d_fullres`` network (random weights, no deep supervision)
to ONNX as ``autoseg export`` does (opset 17), quantises it statically with ONNX Runtime
(QDQ format, int8 weights, uint8 activations, calibrated on ``--calibration`` random patches;
random weights and inputs are enough for speed, not for accuracy), and times one forward pass
of a ``--patch``-sized tile for:

* ONNX Runtime fp32 and ONNX Runtime INT8 (CPU execution provider);
* OpenVINO fp32, bf16 (inference-precision hint) and the same INT8 model, when openvino is installed;
* torch fp32 and torch bf16 autocast (what ``autoseg predict`` runs).

Each figure is the best of ``--repeats`` timed runs after one warm-up, ``--threads`` threads.
Prints ONE JSON object. Run it on a quiet machine (it times):

    python benchmarks/bench_int8.py --patch 128 128 128
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


def quantise(fp32: Path, int8: Path, shape: tuple[int, ...], batches: int) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class RandomPatches(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.standard_normal(shape, dtype=np.float32)} for _ in range(batches)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), RandomPatches(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def onnxruntime_times(models: dict[str, Path], x: np.ndarray, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    out = {}
    for name, path in models.items():
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[f"onnxruntime_{name}"] = best_of(lambda s=session: s.run(None, {"image": x}), repeats)
    return out


def openvino_times(models: dict[str, Path], x: np.ndarray, threads: int, repeats: int) -> dict:
    try:
        import openvino as ov
    except ImportError:
        return {"openvino": "not installed"}
    core, out = ov.Core(), {}
    for name, path, hint in (("fp32", models["fp32"], "f32"), ("bf16", models["fp32"], "bf16"),
                             ("int8", models["int8"], "f32")):
        request = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                        "INFERENCE_NUM_THREADS": threads}).create_infer_request()
        out[f"openvino_{name}"] = best_of(lambda r=request: r.infer({0: x}), repeats)
    return out


def torch_times(network: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    out = {}
    with torch.inference_mode():
        out["torch_fp32"] = best_of(lambda: network(x), repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["torch_bf16"] = best_of(lambda: network(x), repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=4, help="random patches to calibrate INT8 on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = load_plan(TASK01)
    config = plan.configuration("3d_fullres")
    network = build_network(config, len(plan.channel_names), plan.num_classes, deep_supervision=False).eval()
    x = torch.randn(1, len(plan.channel_names), *args.patch)
    with tempfile.TemporaryDirectory() as scratch:
        models = {"fp32": Path(scratch) / "fp32.onnx", "int8": Path(scratch) / "int8.onnx"}
        torch.onnx.export(network, x, str(models["fp32"]), opset_version=17, input_names=["image"],
                          output_names=["logits"], dynamo=False)
        quantise(models["fp32"], models["int8"], tuple(x.shape), args.calibration)
        seconds = {**torch_times(network, x, args.repeats),
                   **onnxruntime_times(models, x.numpy(), args.threads, args.repeats),
                   **openvino_times(models, x.numpy(), args.threads, args.repeats)}
    reference = seconds["torch_bf16"]
    print(json.dumps({"benchmark": "int8_probe", "patch": args.patch, "threads": args.threads,
                      "seconds_per_pass": seconds,
                      "speed_vs_torch_bf16": {k: round(reference / v, 2) for k, v in seconds.items()
                                              if isinstance(v, float)}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
