"""Time nnU-Net v2's training on a raw dataset, for side-by-side benchmarks with autoseg.

Run with the nnU-Net venv's python (benchmarks/nnunet_env.sh installs nnunetv2, psutil and
the budget trainer benchmarks/nnunet_budget_trainer.py there):

    .bench/nnunet-venv/bin/python benchmarks/nnunet_train_timing.py \
        --raw DIR/Dataset123_Name --work SCRATCH --workers 1 --epochs 3 --iterations 20

On a freshly emptied SCRATCH whose nnUNet_raw holds a symlink to the dataset (the three
nnUNet_* path variables are set for nnU-Net's processes only):

1. ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N -npfp N`` (timed: ``plan_s``);
2. ``nnUNetv2_train ID 3d_fullres 0 -device DEVICE -tr nnUNetTrainer_autosegBench`` with
   ``nnUNet_n_proc_DA=--workers`` and ``nnUNet_compile=f``: nnU-Net's default trainer with
   the budget given here and no final validation (``wall_s``: the whole command).

From the training log: ``epoch_times_s`` (nnU-Net's "Epoch time": training + validation
iterations; its logging, plot and checkpoints come after) and ``train_times_s`` (the budget trainer's
"Train time": the training iterations only). ``iterations_per_s`` is iterations / mean
train time and ``epoch_iterations_per_s`` iterations / mean epoch time, both without the
first epoch (warm-up) when there are two or more. Memory of the training process tree is
sampled with psutil every POLL_S seconds: the main (trainer) process, the largest
augmentation worker, and the largest sum over the tree. ``cpu``: the training command's own
CPU seconds and other programs' (bench_train.CpuMeter), to spot a disturbed run. ONE JSON object goes to stdout;
nnU-Net's own output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psutil
from bench_train import CpuMeter
from nnunet_plan_timing import prepare_scratch

POLL_S = 0.1
TRAINER = "nnUNetTrainer_autosegBench"
TRAINER_SOURCE = Path(__file__).resolve().parent / "nnunet_budget_trainer.py"


def check_trainer_installed() -> None:
    import nnunetv2.training.nnUNetTrainer as package

    installed = Path(package.__file__).parent / "autoseg_budget_trainer.py"
    if not installed.is_file() or installed.read_bytes() != TRAINER_SOURCE.read_bytes():
        raise SystemExit(
            f"{installed} is missing or differs from {TRAINER_SOURCE}: "
            "run `bash benchmarks/nnunet_env.sh` to install the budget trainer"
        )


def run_polled(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` (output to stderr); wall time and sampled RSS peaks of its process tree."""
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    root = psutil.Process(proc.pid)
    main_peak = worker_peak = sum_peak = 0
    while proc.poll() is None:
        try:
            children = root.children(recursive=True)
            main = root.memory_info().rss
        except psutil.NoSuchProcess:
            break
        workers = []
        for child in children:
            try:
                workers.append(child.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        main_peak = max(main_peak, main)
        worker_peak = max([worker_peak, *workers])
        sum_peak = max(sum_peak, main + sum(workers))
        time.sleep(POLL_S)
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return {
        "wall_s": time.perf_counter() - start,
        "peak_main_rss_bytes": main_peak,
        "peak_worker_rss_bytes": worker_peak,
        "peak_tree_rss_sum_bytes": sum_peak,
    }


def per_s(iterations: int, times: list[float]) -> float | None:
    counted = times[1:] if len(times) > 1 else times
    return round(iterations * len(counted) / sum(counted), 3) if counted else None


def plan_summary(plans: dict, configuration: str) -> dict:
    conf = plans["configurations"][configuration]
    arch = conf["architecture"]["arch_kwargs"]
    return {
        "patch_size": conf["patch_size"],
        "batch_size": conf["batch_size"],
        "spacing": conf["spacing"],
        "n_stages": arch["n_stages"],
        "features_per_stage": arch["features_per_stage"],
        "strides": arch["strides"],
        "kernel_sizes": arch["kernel_sizes"],
        "convs_per_stage": [arch["n_conv_per_stage"], arch["n_conv_per_stage_decoder"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="dataset in nnU-Net v2 raw layout (DatasetXXX_Name)")
    parser.add_argument("--work", type=Path, required=True, help="scratch dir (emptied first)")
    parser.add_argument("--workers", type=int, default=1, help="augmentation processes (nnUNet_n_proc_DA)")
    parser.add_argument("--plan-processes", type=int, default=2, help="-np / -npfp of plan_and_preprocess")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--val-iterations", type=int, default=2)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    check_trainer_installed()
    raw = args.raw.resolve()
    m = re.fullmatch(r"Dataset(\d{3})_.+", raw.name)
    if m is None:
        parser.error(f"--raw must be a folder named DatasetXXX_Name, got {raw.name!r}")
    dataset_id = str(int(m.group(1)))
    paths = prepare_scratch(args.work.resolve(), raw)
    bin_dir = Path(sys.executable).parent

    env = {**os.environ, **paths}
    n = str(args.plan_processes)
    start = time.perf_counter()
    subprocess.run(
        [
            str(bin_dir / "nnUNetv2_plan_and_preprocess"),
            "-d",
            dataset_id,
            "-c",
            args.configuration,
            "-np",
            n,
            "-npfp",
            n,
        ],
        env=env,
        check=True,
        stdout=sys.stderr,
        stderr=sys.stderr,
    )
    plan_s = time.perf_counter() - start

    env.update(
        {
            "nnUNet_n_proc_DA": str(args.workers),
            "nnUNet_compile": "f",
            "AUTOSEG_BENCH_EPOCHS": str(args.epochs),
            "AUTOSEG_BENCH_ITERATIONS": str(args.iterations),
            "AUTOSEG_BENCH_VAL_ITERATIONS": str(args.val_iterations),
        }
    )
    with CpuMeter() as cpu:
        train = run_polled(
            [
                str(bin_dir / "nnUNetv2_train"),
                dataset_id,
                args.configuration,
                "0",
                "-device",
                args.device,
                "-tr",
                TRAINER,
            ],
            env,
        )

    preprocessed = Path(paths["nnUNet_preprocessed"]) / raw.name
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    splits = json.loads((preprocessed / "splits_final.json").read_text())
    logs = sorted(Path(paths["nnUNet_results"]).rglob("training_log_*.txt"))
    log = logs[-1].read_text()
    epoch_times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    train_times = [float(t) for t in re.findall(r"Train time: ([0-9.]+) s", log)]
    if len(train_times) != args.epochs or len(epoch_times) != args.epochs:
        raise SystemExit(
            f"expected {args.epochs} epochs in {logs[-1]}, found {len(train_times)} train times "
            f"and {len(epoch_times)} epoch times"
        )
    print(
        json.dumps(
            {
                "tool": "nnunetv2",
                "version": version("nnunetv2"),
                "torch": version("torch"),
                "trainer": TRAINER,
                "device": args.device,
                "workers": args.workers,
                "train_cases": len(splits[0]["train"]),
                "plan": plan_summary(plans, args.configuration),
                "plan_and_preprocess_s": round(plan_s, 2),
                "train_times_s": [round(t, 2) for t in train_times],
                "epoch_times_s": epoch_times,
                "iterations_per_s": per_s(args.iterations, train_times),
                "epoch_iterations_per_s": per_s(args.iterations, epoch_times),
                "wall_s": round(train["wall_s"], 2),
                **{k: v for k, v in train.items() if k != "wall_s"},
                "cpu": cpu.report,
            }
        )
    )


if __name__ == "__main__":
    main()
