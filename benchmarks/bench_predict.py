"""Benchmark prediction on CPU: autoseg against ``nnUNetv2_predict``, side by side, same network and data.

What runs (one after another, never two at once, each setting in a fresh process):

* ``autoseg-{fp32,bf16}-{tta,notta}``: ``Predictor.predict_case`` on one synthetic
  brain case (4 channels, ``--shape`` z y x, default 155 240 240 = a BraTS 240x240x155x4
  volume, 1 mm, one 4D NIfTI) with the Task01 reference plan's 3d_fullres network
  (plans/Task01_BrainTumour/plans.json: 6 stages, patch 128^3, 31 M parameters), random
  weights, 1 fold, ``--step`` overlap, ``--threads`` torch threads;
* on request (``--settings``): ``autoseg-compiled-{fp32,bf16}-{tta,notta}``, the same with
  ``predict --compile`` (``setup_s`` is the compilation); the same through the ONNX backends of
  ``predict --backend``:
  ``autoseg-openvino-{fp32,bf16,int8}-{tta,notta}`` and ``autoseg-onnxruntime-fp32-{tta,notta}``
  (the network exported to ONNX in memory before the clock starts; int8: quantised as
  ``export --int8`` does, in a process of its own, calibrated on random patches,
  ``int8_quantise_s``: speed only, its accuracy is benchmarks/bench_predict_accuracy.py's);
* ``nnunet-{tta,notta}``: ``nnUNetv2_predict -f 0 -device cpu`` (benchmarks/nnunet_predict_timing.py,
  from the nnU-Net venv) on the same case written as four ``_0000..0003`` files, with the
  plan nnU-Net's own planner makes from the same Task01 fingerprint and nnU-Net's own
  network from it, random weights, fp32 (nnU-Net has no bf16 on a CPU), default workers
  (``-npp 3 -nps 3``). nnU-Net always uses all cores (it calls torch.set_num_threads(cpu_count)).
* ``--ct``: the memory case, autoseg only: a 512x512x500 single-channel CT (``--ct-shape``)
  with 15 classes (14 labels), fp32, no TTA; see ``ct.why_narrow`` in the output. Predicted at
  the input's spacing (no resampling), or with ``--ct-resample`` at the Liver plan's target
  spacing, so that the export resamples all 15 probability maps back to the input grid
  (``--ct-spacing`` sets the input's spacing).

Figures (ONE JSON object on stdout; progress and the tools' own output on stderr):

* ``seconds``: one case end to end, reading + preprocessing + sliding window + export of
  the uint8 NIfTI (autoseg: the ``predict_case`` call; loading the network is outside, as
  nnU-Net's start-up is). nnU-Net: ``seconds_per_case`` from its time-stamped log (from
  "There are N cases that I would like to predict" to "Segmentation export complete."),
  ``wall_s`` the whole command, ``startup_s`` the part before the case;
* ``export_s`` (autoseg): from the accumulated probabilities to the written mask (resampling
  back, painting labels, undoing the crop, writing the NIfTI); ``export_share`` = its share of
  ``seconds``;
* ``peak_rss_gb``: autoseg: the predicting process's peak RSS (VmHWM, exact; one process);
  nnU-Net: its process tree sampled every 0.1 s: ``peak_tree_pss_sum_gb`` (physical memory,
  shared pages split between processes), ``peak_tree_rss_sum_gb`` (shared library pages
  counted once per process: an upper bound) and ``peak_main_rss_gb``;
  ``within_limit``: autoseg's peak against the issue's limits (3 GiB for the brain case,
  8 GiB for the CT);
* ``forward_passes`` = tiles x mirrors (counted by a forward hook on autoseg's network; for
  nnU-Net the total of its tile progress bar x 8 with TTA);
* ``conv_tflops``: convolution and transposed-convolution FLOPs of one forward pass
  (2 x multiply-adds, counted by hooks on a meta-device run at the patch size) x passes /
  autoseg's time inside the network's forward (hooked); ``efficiency``: that against
  ``conv_peak``, the best of a few runs of ONE Conv3d 32->32 3x3x3 on a 1x32x128^3 input
  (``--peak-size``) at the same precision and thread count (above 1 when that reference
  missed its own peak, e.g. with a small ``--peak-size``). ``window_conv_tflops``: the
  same FLOPs over the whole sliding window (``sliding_window_s``: network + flips +
  Gaussian accumulation), the only network time nnU-Net's log shows (given for nnU-Net
  when ``same_plan``, i.e. its network does the same convolutions);
* ``ratios``: per autoseg setting against nnU-Net with the same TTA (nnU-Net is always
  fp32): ``speedup`` = nnU-Net's seconds per case / autoseg's (issue 13's goals: >= 3 for the
  default, >= 5 for the fastest setting within the accuracy tolerance), ``speedup_with_setup`` the
  same with each tool's start-up added (nnU-Net's ``startup_s``, autoseg's ``setup_s``),
  ``sliding_window_speedup``, and autoseg's peak RSS / nnU-Net's tree PSS and RSS sums;
* ``same_plan``: whether nnU-Net's plan equals ours (patch, batch, spacing, stages,
  features, strides, kernels) before any ``--patch`` override;
* ``cpu`` per run: wall, own CPU seconds and other programs' CPU seconds over the run
  (``other_cpu_s`` well above 0 means someone else slowed it down); ``code``: the commit.

    python benchmarks/bench_predict.py                      # full size, every setting: ~20-25 min on 2 quiet
                                                            # cores (the phantom crops to 127x210x184: 6 tiles;
                                                            # fp32 TTA and nnU-Net TTA 48 passes, ~5-6 min each)
    python benchmarks/bench_predict.py --settings --ct      # CT memory case only: ~10 min (343 tiles of a narrow
                                                            # network, ~1 s each), needs ~10 GB free
    python benchmarks/bench_predict.py --shape 48 64 56 --patch 64 64 64 --peak-size 64   # development, ~1-2 min
    python benchmarks/bench_predict.py --settings --ct --ct-shape 100 160 160              # development
    python benchmarks/bench_predict.py --settings --ct --ct-spacing 0.8 0.7 0.7 --ct-resample  # export share

nnU-Net runs from its own virtual environment: ``bash benchmarks/nnunet_env.sh`` once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import CpuMeter, autoseg_plan_summary, code_state, same_plan

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DEFAULT_NNUNET_PYTHON = REPO / ".bench" / "nnunet-venv" / "bin" / "python"
TASK01 = REPO / "plans" / "Task01_BrainTumour"
LIVER_PLAN = REPO / "plans" / "Task03_Liver" / "plans.json"
CONFIGURATION = "3d_fullres"
GIB = 1024**3
BRAIN_LIMIT_GIB, CT_LIMIT_GIB = 3, 8
CT_CLASSES = 15
CT_SPACING = (1.0, 0.7676, 0.7676)  # the Liver plan's median spacing (z, y, x)
SETTINGS = {  # name -> (backend, precision, tta, --compile); the torch backend's names carry no backend
    **{
        f"autoseg-{precision}-{tta}": ("torch", precision, tta == "tta", False)
        for precision in ("fp32", "bf16")
        for tta in ("tta", "notta")
    },
    **{
        f"autoseg-compiled-{precision}-{tta}": ("torch", precision, tta == "tta", True)
        for precision in ("fp32", "bf16")
        for tta in ("tta", "notta")
    },
    **{
        f"autoseg-openvino-{precision}-{tta}": ("openvino", precision, tta == "tta", False)
        for precision in ("fp32", "bf16", "int8")
        for tta in ("tta", "notta")
    },
    **{f"autoseg-onnxruntime-fp32-{tta}": ("onnxruntime", "fp32", tta == "tta", False) for tta in ("tta", "notta")},
    "nnunet-tta": ("torch", "fp32", True, False),
    "nnunet-notta": ("torch", "fp32", False, False),
}
#: what a run without --settings measures (the ONNX backends on request)
DEFAULT_SETTINGS = [
    "autoseg-fp32-tta",
    "autoseg-fp32-notta",
    "autoseg-bf16-tta",
    "autoseg-bf16-notta",
    "nnunet-tta",
    "nnunet-notta",
]
# A child process runs one function of this module on a JSON spec and prints one JSON line.
CHILD = (
    f"import json, sys; sys.path.insert(0, {str(BENCH)!r}); import bench_predict as b; "
    "print(json.dumps(getattr(b, sys.argv[1])(json.loads(sys.argv[2]))))"
)


def note(message: str) -> None:
    print(f"[bench_predict] {message}", file=sys.stderr, flush=True)


def run_child(function: str, spec: dict) -> tuple[dict, dict]:
    """``function(spec)`` in a fresh interpreter (its own peak memory, threads); its result and CPU use."""
    with CpuMeter() as cpu:  # cwd=REPO: ``-c`` puts it first on sys.path, so THIS checkout's autoseg runs
        out = subprocess.run(
            [sys.executable, "-c", CHILD, function, json.dumps(spec)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    return json.loads(out.stdout.strip().splitlines()[-1]), cpu.report


# --------------------------------------------------------------------------- children (run in fresh processes)


def write_brain(spec: dict) -> dict:
    """The same phantom twice: one 4D NIfTI for autoseg, four channel files for nnU-Net (same seed)."""
    from autoseg.phantoms import synthetic

    root, shape = Path(spec["root"]), tuple(spec["shape"])
    synthetic.write_msd_brain(root / "msd", 1, shape=shape)
    synthetic.write_nnunet_brain(root / "nnunet", 1, shape=shape)
    return {
        "autoseg_image": str(root / "msd" / "imagesTr" / "BRATS_001.nii.gz"),
        "nnunet_input": str(root / "nnunet" / "imagesTr"),
    }


def write_ct(spec: dict) -> dict:
    """One CT phantom at ``spacing`` (the writer varies z per case); its actual spacing is returned."""
    from autoseg.data.io.images import read_geometry
    from autoseg.phantoms import synthetic

    root = synthetic.write_nnunet_ct(
        Path(spec["root"]) / "ct", 1, shape=tuple(spec["shape"]), spacing=tuple(spec["spacing"])
    )
    image = root / "imagesTr" / "CT_001_0000.nii.gz"
    return {"image": str(image), "spacing": list(read_geometry(image).spacing)}


def task01_summary(spec: dict) -> dict:
    """Our Task01 3d_fullres plan in bench_train's summary form, to compare with nnU-Net's."""
    from autoseg.core.plan import load_plan

    return autoseg_plan_summary(load_plan(TASK01 / "plans.json").configuration(CONFIGURATION))


def task01_plan(patch: list[int] | None):
    """The Task01 reference plan, its 3d_fullres patch replaced for small development runs."""
    import dataclasses

    from autoseg.core.plan import load_plan

    plan = load_plan(TASK01 / "plans.json")
    if patch:
        config = dataclasses.replace(plan.configuration(CONFIGURATION), patch_size=list(patch))
        plan = dataclasses.replace(plan, configurations={CONFIGURATION: config})
    return plan


def ct_plan(spacing: list[float] | None, features: list[int]):
    """The Liver plan with 15 classes, target ``spacing`` (None: the plan's own) and a narrow network."""
    import dataclasses

    from autoseg.core.plan import load_plan

    plan = load_plan(LIVER_PLAN)
    config = plan.configuration(CONFIGURATION)
    network = dataclasses.replace(config.network, features_per_stage=list(features))
    config = dataclasses.replace(config, spacing=list(spacing or config.spacing), network=network)
    labels = {"background": 0, **{f"structure_{i}": i for i in range(1, CT_CLASSES)}}
    return dataclasses.replace(
        plan,
        labels=labels,
        output_label_values={str(i): i for i in range(CT_CLASSES)},
        configurations={CONFIGURATION: config},
    )


def conv_flops(config, in_channels: int, num_classes: int) -> int:
    """FLOPs (2 x multiply-adds) of the convolutions of one forward pass of one patch, on the meta device."""
    import math

    import torch
    from torch import nn

    from autoseg.model.network import build_network

    total = 0

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # every input voxel scatters a kernel
            total += 2 * inputs[0].numel() * module.out_channels * kernel // module.groups
        else:
            total += 2 * output.numel() * module.in_channels * kernel // module.groups

    with torch.device("meta"):
        network = build_network(config, in_channels, num_classes, deep_supervision=False).eval()
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                module.register_forward_hook(count)
        with torch.inference_mode():
            network(torch.empty(1, in_channels, *config.patch_size))
    return total


def conv_peak(spec: dict) -> dict:
    """TFLOP/s of ONE Conv3d 32->32 3x3x3 on 1x32xS^3, fp32 and bf16 autocast: the machine's attainable peak."""
    import torch

    torch.set_num_threads(spec["threads"])
    size, channels = spec["size"], 32
    flops = 2 * channels * channels * 27 * size**3
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).eval()
    x = torch.randn(1, channels, size, size, size)
    out = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for _ in range(spec["repeats"] + 1):  # the first run is the warm-up
                start = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - start)
        out[precision] = {"best_s": round(min(times[1:]), 4), "tflops": round(flops / min(times[1:]) / 1e12, 3)}
    return {"layer": f"Conv3d {channels}->{channels} 3x3x3, input 1x{channels}x{size}^3", "flops": flops, **out}


def autoseg_predict(spec: dict) -> dict:
    """Predict one case with random weights; time, forward passes, network time and peak RSS of this process."""
    import resource

    import torch

    from autoseg.data.io.datasets import CaseFiles
    from autoseg.inference import fold_ensemble as predictor_module
    from autoseg.inference import predictor as predictor_code
    from autoseg.inference.predictor import Predictor

    torch.set_num_threads(spec["threads"])
    plan, weights = random_model(spec)
    config = plan.configuration(CONFIGURATION)
    channels = len(plan.channel_names)
    start = time.perf_counter()
    predictor = Predictor.from_weights(
        plan,
        CONFIGURATION,
        [weights],
        device="cpu",
        tta=spec["tta"],
        step=spec["step"],
        precision=spec["precision"],
        backend=spec.get("backend", "torch"),
        torch_compile=spec.get("compile", False),
        int8_files=[Path(spec["int8_model"])] if "int8_model" in spec else (),
    )
    del weights
    setup = time.perf_counter() - start  # building the backend's model: compiling it, with --compile

    network_time, passes = 0.0, 0
    member = predictor.members[0]
    tile_model = member.models[0]

    def timed_model(tiles):  # any backend's tile model: network time and passes
        nonlocal network_time, passes
        begin = time.perf_counter()
        try:
            return tile_model(tiles)
        finally:
            network_time += time.perf_counter() - begin
            passes += tiles.shape[0]

    member.models[0] = timed_model
    timed = {"sliding_window": 0.0, "export": 0.0}
    time_calls(predictor_module, ["predict_probabilities"], timed, "sliding_window")  # comparable to nnU-Net's
    time_calls(predictor_code, ["probabilities_to_labels", "to_output_values", "write_label"], timed, "export")
    case = CaseFiles("bench", (Path(spec["image"]),), None)
    start = time.perf_counter()
    predictor.predict_case(case, Path(spec["output"]))  # the folder; the mask is <case>.nii.gz in it
    seconds = time.perf_counter() - start
    mirrors = 2**config.dims if spec["tta"] else 1
    return {
        "seconds": round(seconds, 2),
        "setup_s": round(setup, 2),
        "network_s": round(network_time, 2),
        "sliding_window_s": round(timed["sliding_window"], 2),
        "export_s": round(timed["export"], 2),
        "export_share": round(timed["export"] / seconds, 3),
        "forward_passes": passes,
        "tiles": passes // mirrors,
        "mirror_batch": predictor.members[0].window.max_batch,
        "flops_per_pass": conv_flops(config, channels, plan.num_classes),
        "peak_rss_gb": vm_hwm_gb(),
        "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
        "compiled": member.torch_compile,
        "int8_quantise_s": spec.get("int8_quantise_s"),
        "torch_threads": torch.get_num_threads(),
        "patch": config.patch_size,
        "features": config.network.features_per_stage,
        "num_classes": plan.num_classes,
    }


def random_model(spec: dict):
    """The spec's plan and its network's random weights (seed 0): the same in every child process, so the
    INT8 model quantised in one matches the weights predicted with in another (its digest is checked)."""
    import torch

    from autoseg.model.network import build_network

    torch.manual_seed(0)
    plan = ct_plan(spec["spacing"], spec["features"]) if spec["kind"] == "ct" else task01_plan(spec["patch"])
    config = plan.configuration(CONFIGURATION)
    network = build_network(config, len(plan.channel_names), plan.num_classes, deep_supervision=False)
    return plan, network.state_dict()


def int8_model(spec: dict) -> dict:
    """The spec's network exported and quantised as ``export --int8`` does, calibrated on random patches
    (enough for speed, not for accuracy: benchmarks/bench_predict_accuracy.py judges that), in a process
    of its own so that its memory is not counted as prediction's; the file and the seconds."""
    import numpy as np
    import torch

    from autoseg.deploy.int8 import quantise
    from autoseg.inference.onnx_export import export_onnx

    torch.set_num_threads(spec["threads"])
    plan, weights = random_model(spec)
    config = plan.configuration(CONFIGURATION)
    channels = len(plan.channel_names)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    tiles = [rng.standard_normal((1, channels, *config.patch_size), dtype=np.float32) for _ in range(4)]
    path = Path(spec["output"]) / "int8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(quantise(export_onnx(weights, config, channels, plan.num_classes), tiles))
    return {"path": str(path), "seconds": round(time.perf_counter() - start, 1)}


def time_calls(module, names: list[str], totals: dict, key: str) -> None:
    """Wrap ``module``'s functions ``names`` so that their wall time adds up in ``totals[key]``."""

    def timed(function):
        def call(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - begin

        return call

    for name in names:
        setattr(module, name, timed(getattr(module, name)))


def vm_hwm_gb() -> float | None:
    """This address space's peak RSS. Unlike ru_maxrss it cannot inherit the parent's high-water mark
    (Linux carries a vfork()ing parent's peak into the child's ru_maxrss at exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / GIB, 3)
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the side-by-side runs


def autoseg_settings(names: list[str], image: str, scratch: Path, args, peak: dict) -> dict:
    """Each autoseg setting in its own process, with its conv TFLOP/s against the single-layer peak."""
    results = {}
    for name in names:
        backend, precision, tta, compiled = SETTINGS[name]
        note(f"{name}: predicting")
        spec = {
            "kind": "brain",
            "image": image,
            "output": str(scratch / name),
            "tta": tta,
            "precision": precision,
            "backend": backend,
            "compile": compiled,
            "step": args.step,
            "threads": args.threads,
            "patch": args.patch,
        }
        if precision == "int8":
            quantised = run_child("int8_model", spec)[0]
            spec |= {"int8_model": quantised["path"], "int8_quantise_s": quantised["seconds"]}
        result, cpu = run_child("autoseg_predict", spec)
        flops = result["flops_per_pass"] * result["forward_passes"]
        tflops = flops / result["network_s"] / 1e12
        results[name] = {
            **result,
            "conv_tflops": round(tflops, 3),
            "efficiency": round(tflops / peak[precision]["tflops"], 3) if precision in peak else None,
            "window_conv_tflops": round(flops / result["sliding_window_s"] / 1e12, 3),
            "within_limit": {"limit_gib": BRAIN_LIMIT_GIB, "ok": result["peak_rss_gb"] <= BRAIN_LIMIT_GIB},
            "cpu": cpu,
        }
    return results


def nnunet_settings(names: list[str], nnunet_input: str, scratch: Path, args) -> dict:
    """nnUNetv2_predict for each requested TTA setting (benchmarks/nnunet_predict_timing.py, nnU-Net's venv)."""
    settings = [name.removeprefix("nnunet-") for name in names]
    cmd = [
        str(args.nnunet_python),
        str(BENCH / "nnunet_predict_timing.py"),
        "--fingerprint",
        str(TASK01 / "fingerprint.json"),
        "--input",
        nnunet_input,
        "--work",
        str(scratch / "nnunet_work"),
        "--settings",
        *settings,
        "--step",
        str(args.step),
    ]
    if args.patch:
        cmd += ["--patch", *map(str, args.patch)]
    note(f"nnU-Net: {', '.join(names)}")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=BENCH)
    return json.loads(out.stdout.strip().splitlines()[-1])


def window_tflops(runs: dict, flops_per_pass: int, peak: dict) -> None:
    """nnU-Net's conv TFLOP/s over its whole sliding window (its network time alone is not visible)."""
    for run in runs.values():
        if run["forward_passes"]:
            tflops = flops_per_pass * run["forward_passes"] / run["sliding_window_s"] / 1e12
            run["window_conv_tflops"] = round(tflops, 3)
            run["window_efficiency"] = round(tflops / peak["fp32"]["tflops"], 3)


def ratios(ours: dict, theirs: dict) -> dict:
    """nnU-Net / autoseg seconds (speedup) and autoseg / nnU-Net memory, per autoseg setting, same TTA."""
    out = {}
    for name, result in ours.items():
        tta = "tta" if SETTINGS[name][2] else "notta"
        other = theirs.get(tta)
        if other is None:
            continue
        speedup = other["seconds_per_case"] / result["seconds"]
        with_setup = (other["startup_s"] + other["seconds_per_case"]) / (result["setup_s"] + result["seconds"])
        out[f"{name}/nnunet-{tta}"] = {
            "speedup": round(speedup, 2),
            "goal_3x_met": speedup >= 3,
            "goal_5x_met": speedup >= 5,
            "speedup_with_setup": round(with_setup, 2),
            "sliding_window_speedup": round(other["sliding_window_s"] / result["sliding_window_s"], 2),
            "memory_vs_tree_pss": round(result["peak_rss_gb"] / other["peak_tree_pss_sum_gb"], 2),
            "memory_vs_tree_rss": round(result["peak_rss_gb"] / other["peak_tree_rss_sum_gb"], 2),
        }
    return out


def ct_case(scratch: Path, args) -> dict:
    """The 15-class CT through a narrowed Liver network: autoseg's peak RSS against 8 GiB."""
    note(f"CT memory case: writing a {'x'.join(map(str, args.ct_shape))} volume")
    written = run_child("write_ct", {"root": str(scratch), "shape": args.ct_shape, "spacing": args.ct_spacing})[0]
    image, spacing = written["image"], written["spacing"]
    note("CT memory case: predicting")
    spec = {
        "kind": "ct",
        "image": image,
        "output": str(scratch / "ct_prediction"),
        "tta": False,
        "precision": "fp32",
        "step": args.step,
        "threads": args.threads,
        "spacing": None if args.ct_resample else spacing,
        "features": args.ct_features,
    }
    result, cpu = run_child("autoseg_predict", spec)
    return {
        "shape_zyx": args.ct_shape,
        "spacing_zyx": [round(s, 4) for s in spacing],
        **result,
        "within_limit": {"limit_gib": CT_LIMIT_GIB, "ok": result["peak_rss_gb"] <= CT_LIMIT_GIB},
        "cpu": cpu,
        "plan": "plans/Task03_Liver 3d_fullres, 15 classes, target spacing "
        + ("the plan's (resampled in and back)" if args.ct_resample else "= the input's (no resampling)")
        + f", features {args.ct_features} instead of [32, 64, 128, 256, 320, 320]",
        "why_narrow": "memory is dominated by the volume-sized buffers (image, 15-class accumulator, "
        "probabilities, export), which do not depend on the network's width; the full-width "
        "network over 7x7x7 tiles would take about an hour on this CPU and would add only its "
        "activations (~1.3 GB fp32 at 128^3, bounded by the predictor's activation budget)",
    }


def brain_case(scratch: Path, args) -> dict:
    """Every requested Task01 setting on one 4-channel case, the conv peak and the ratios."""
    note(f"brain case: writing a {'x'.join(map(str, args.shape))}x4 volume")
    data = run_child("write_brain", {"root": str(scratch), "shape": args.shape})[0]
    note(f"single Conv3d peak at {args.peak_size}^3")
    peak, peak_cpu = run_child(
        "conv_peak", {"size": args.peak_size, "repeats": args.peak_repeats, "threads": args.threads}
    )
    ours = autoseg_settings(
        [n for n in args.settings if n.startswith("autoseg")], data["autoseg_image"], scratch, args, peak
    )
    out = {
        "shape_zyx": args.shape,
        "channels": 4,
        "plan": "plans/Task01_BrainTumour 3d_fullres",
        "patch_override": args.patch,
        "conv_peak": {**peak, "cpu": peak_cpu},
        "autoseg": ours,
    }
    nnunet_names = [n for n in args.settings if n.startswith("nnunet")]
    if nnunet_names:
        theirs = nnunet_settings(nnunet_names, data["nnunet_input"], scratch, args)
        ours_plan = run_child("task01_summary", {})[0]
        out["nnunet"] = theirs
        out["same_plan"] = same_plan(ours_plan, theirs["plan"])
        if out["same_plan"] and ours:  # then nnU-Net's network does the same convolutions as ours
            window_tflops(theirs["runs"], next(iter(ours.values()))["flops_per_pass"], peak)
        out["ratios"] = ratios(ours, theirs["runs"])
        if args.threads != os.cpu_count():
            out["note"] = f"nnU-Net used {os.cpu_count()} threads (it always takes every core), autoseg {args.threads}"
    return out


def memory_goals(report: dict) -> dict:
    """The issue's two limits against autoseg's largest peak RSS in each case."""
    goals = {}
    if report.get("brain", {}).get("autoseg"):
        runs = report["brain"]["autoseg"]
        worst = max(runs, key=lambda name: runs[name]["peak_rss_gb"])
        goals["brain_4ch"] = {
            "shape_zyx": report["brain"]["shape_zyx"],
            "limit_gib": BRAIN_LIMIT_GIB,
            "peak_rss_gb": runs[worst]["peak_rss_gb"],
            "setting": worst,
            "ok": runs[worst]["peak_rss_gb"] <= BRAIN_LIMIT_GIB,
        }
    if "ct" in report:
        goals["ct_15_classes"] = {
            "shape_zyx": report["ct"]["shape_zyx"],
            "limit_gib": CT_LIMIT_GIB,
            "peak_rss_gb": report["ct"]["peak_rss_gb"],
            "ok": report["ct"]["within_limit"]["ok"],
        }
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings",
        nargs="*",
        choices=list(SETTINGS),
        default=DEFAULT_SETTINGS,
        help="which runs; none with --ct runs the CT memory case alone",
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[155, 240, 240], help="z y x of the brain case")
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=None,
        help="override the Task01 patch (128^3) in both tools, for small development runs",
    )
    parser.add_argument("--step", type=float, default=0.5, help="sliding-window step, fraction of the patch")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="autoseg's torch threads")
    parser.add_argument("--peak-size", type=int, default=128, help="edge of the single Conv3d's input")
    parser.add_argument("--peak-repeats", type=int, default=5, help="timed runs of the single Conv3d")
    parser.add_argument("--ct", action="store_true", help="also run the CT memory case")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[500, 512, 512], help="z y x of the CT")
    parser.add_argument(
        "--ct-spacing", type=float, nargs=3, default=list(CT_SPACING), help="z y x spacing of the CT written (mm)"
    )
    parser.add_argument(
        "--ct-resample",
        action="store_true",
        help="predict at the Liver plan's target spacing (resampling in and back) instead of the input's",
    )
    parser.add_argument(
        "--ct-features",
        type=int,
        nargs="+",
        default=[4, 8, 16, 16, 16, 16],
        help="features per stage of the narrowed CT network (6 stages)",
    )
    parser.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    args = parser.parse_args()
    if not args.settings and not args.ct:
        parser.error("nothing to run: give --settings and/or --ct")
    if any(n.startswith("nnunet") for n in args.settings) and not args.nnunet_python.is_file():
        parser.error(f"{args.nnunet_python} not found: run `bash benchmarks/nnunet_env.sh` first")

    code = code_state()
    scratch = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    report: dict = {
        "benchmark": "predict",
        "code": code,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "step": args.step,
    }
    try:
        if args.settings:
            report["brain"] = brain_case(scratch, args)
        if args.ct:
            report["ct"] = ct_case(scratch, args)
        report["memory_goals"] = memory_goals(report)
        report["code"]["autoseg_modified_at_end"] = code_state()["autoseg_modified"]
        report["load_avg_1min"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
        report["total_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
