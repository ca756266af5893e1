"""Time ``nnUNetv2_predict`` on CPU, for benchmarks/bench_predict.py's side-by-side runs.

Run with the nnU-Net venv's python (benchmarks/nnunet_env.sh):

    .bench/nnunet-venv/bin/python benchmarks/nnunet_predict_timing.py \
        --fingerprint plans/Task01_BrainTumour/fingerprint.json --input DIR --work SCRATCH --settings tta notta

1. nnU-Net's own default ExperimentPlanner plans our fingerprint
   (benchmarks/nnunet_plans_from_fingerprint.py), optionally with the 3d_fullres patch
   overridden (``--patch``, small development runs only);
2. a results folder ``nnUNet_results/DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres``
   gets that plans.json, a dataset.json and ``fold_0/checkpoint_final.pth``: nnU-Net's own
   network built from the plan (``nnUNetTrainer.build_network_architecture``), random weights;
3. per setting, ``nnUNetv2_predict -i INPUT -o OUT -d ID -c 3d_fullres -f 0 -device cpu
   -step_size STEP [--disable_tta]`` with nnU-Net's default worker counts (``-npp 3 -nps 3``
   unless ``--npp/--nps``), the nnUNet_* path variables set for that process only.

Each output line of the command is time-stamped on arrival (``PYTHONUNBUFFERED=1``), which
splits the wall time with nnU-Net's own log: ``startup_s`` (imports, checkpoint, network)
ends at "There are N cases that I would like to predict"; ``seconds_per_case`` runs from
there to "Segmentation export complete." (reading, preprocessing, sliding window, export,
divided by the number of cases); ``sliding_window_s`` from "Predicting CASE:" to "sending off
prediction" (network + Gaussian accumulation, per case); ``tiles`` is the total of its tqdm
bar. Memory: the process tree (main process, spawned preprocessing and export workers)
sampled every POLL_S s with psutil: the peak of the summed RSS (counts shared library pages
once per process, an upper bound), of the summed PSS (shared pages split between the
processes that map them: the physical memory), and the main process's peak RSS. Sampling
can miss a spike shorter than POLL_S. ``cpu``: own and other programs' CPU seconds
(bench_train.CpuMeter). ONE JSON object on stdout; nnU-Net's output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import psutil
from bench_train import CpuMeter
from nnunet_plans_from_fingerprint import dataset_folder_name, plan_from_fingerprint, to_nnunet_dataset_json
from nnunet_train_timing import plan_summary

POLL_S = 0.1
CONFIGURATION = "3d_fullres"
TRAINER_FOLDER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
STARTED = re.compile(r"There are \d+ cases that I would like to predict")
PREDICTING = re.compile(r"^Predicting .+:$")
SENDING = "sending off prediction to background worker"
EXPORTED = "Segmentation export complete."
TQDM_TOTAL = re.compile(r"^\s*\d+%\|.*\|\s*\d+/(\d+) \[")


def write_results_folder(results: Path, folder: str, plans: dict, dataset_json: dict) -> Path:
    """nnU-Net's trained-model folder for fold 0, with its own network's random weights."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = results / folder / TRAINER_FOLDER
    (model / "fold_0").mkdir(parents=True, exist_ok=True)
    (model / "plans.json").write_text(json.dumps(plans, indent=1))
    (model / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    network = nnUNetTrainer.build_network_architecture(
        manager,
        configuration,
        determine_num_input_channels(manager, configuration, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )
    torch.save(
        {
            "network_weights": network.state_dict(),
            "trainer_name": "nnUNetTrainer",
            "init_args": {
                "plans": plans,
                "configuration": CONFIGURATION,
                "fold": 0,
                "dataset_json": dataset_json,
                "device": "cpu",
            },
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        model / "fold_0" / "checkpoint_final.pth",
    )
    return model


class TreeMemory:
    """Peaks of the summed RSS and PSS of a process tree and of its root's RSS, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.rss_sum = self.pss_sum = self.main_rss = 0
        self.max_processes = 1

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        for i, process in enumerate(processes):
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + info.pss
            if i == 0:
                self.main_rss = max(self.main_rss, info.rss)
        self.rss_sum, self.pss_sum = max(self.rss_sum, rss), max(self.pss_sum, pss)
        self.max_processes = max(self.max_processes, len(processes))


def run_timestamped(cmd: list[str], env: dict[str, str]) -> tuple[float, list[tuple[float, str]], TreeMemory]:
    """Run ``cmd``; its wall time, its output lines with arrival times (s from start), memory peaks."""
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )  # text mode: tqdm's \r updates arrive as lines too
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            sys.stderr.write(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    memory = TreeMemory(proc.pid)
    while proc.poll() is None:
        memory.sample()
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return wall, lines, memory


def split_log(lines: list[tuple[float, str]], wall: float) -> dict:
    """Start-up, per-case and sliding-window seconds and the tile count from the time-stamped log."""

    def first(pattern) -> float | None:
        return next((t for t, s in lines if (pattern.search(s) if hasattr(pattern, "search") else pattern in s)), None)

    started, exported = first(STARTED), first(EXPORTED)
    predicting = [t for t, s in lines if PREDICTING.match(s.strip())]
    sending = [t for t, s in lines if SENDING in s]
    cases = len(predicting)
    if started is None or exported is None or cases == 0 or len(sending) != cases:
        raise SystemExit("nnUNetv2_predict's log lacks the expected lines; cannot split its wall time")
    tiles = [int(m.group(1)) for _, s in lines if (m := TQDM_TOTAL.match(s))]  # the sliding-window bars
    return {
        "startup_s": round(started, 2),
        "seconds_per_case": round((exported - started) / cases, 2),
        "sliding_window_s": round(sum(b - a for a, b in zip(predicting, sending)) / cases, 2),
        "export_and_exit_s": round(wall - sending[-1], 2),
        "cases": cases,
        "tiles": max(tiles) if tiles else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprint", type=Path, required=True, help="our fingerprint JSON (the plan's source)")
    parser.add_argument("--input", type=Path, required=True, help="folder of CASE_0000.nii.gz ... channel files")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for nnUNet_* trees and outputs")
    parser.add_argument("--settings", nargs="+", choices=["tta", "notta"], default=["tta", "notta"])
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="override the planned 3d_fullres patch")
    parser.add_argument("--step", type=float, default=0.5, help="-step_size")
    parser.add_argument("--npp", type=int, default=3, help="-npp: preprocessing processes (nnU-Net default 3)")
    parser.add_argument("--nps", type=int, default=3, help="-nps: export processes (nnU-Net default 3)")
    parser.add_argument("--dataset-id", type=int, default=903)
    args = parser.parse_args()

    ours = json.loads(args.fingerprint.read_text())
    work = args.work.resolve()
    plans = plan_from_fingerprint(ours, work, args.dataset_id, gpu_memory_gb=8.0)  # sets nnUNet_* in THIS process
    planned = plan_summary(plans, CONFIGURATION)
    if args.patch:
        plans["configurations"][CONFIGURATION]["patch_size"] = list(args.patch)
    folder = dataset_folder_name(ours, args.dataset_id)
    dataset_json = {k: v for k, v in to_nnunet_dataset_json(ours).items() if k != "dataset"}
    write_results_folder(work / "nnUNet_results", folder, plans, dataset_json)

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        **{k: str(work / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
    }
    predict = Path(sys.executable).parent / "nnUNetv2_predict"
    runs = {}
    for setting in args.settings:
        output = work / f"out_{setting}"
        cmd = [
            str(predict),
            "-i",
            str(args.input.resolve()),
            "-o",
            str(output),
            "-d",
            str(args.dataset_id),
            "-c",
            CONFIGURATION,
            "-f",
            "0",
            "-device",
            "cpu",
            "-step_size",
            str(args.step),
            "-npp",
            str(args.npp),
            "-nps",
            str(args.nps),
        ] + (["--disable_tta"] if setting == "notta" else [])
        with CpuMeter() as cpu:
            wall, lines, memory = run_timestamped(cmd, env)
        timing = split_log(lines, wall)
        timing["forward_passes"] = timing["tiles"] * (8 if setting == "tta" else 1) if timing["tiles"] else None
        runs[setting] = {
            "wall_s": round(wall, 2),
            **timing,
            "peak_tree_rss_sum_gb": round(memory.rss_sum / 1024**3, 3),
            "peak_tree_pss_sum_gb": round(memory.pss_sum / 1024**3, 3),
            "peak_main_rss_gb": round(memory.main_rss / 1024**3, 3),
            "max_processes": memory.max_processes,
            "cpu": cpu.report,
        }
    print(
        json.dumps(
            {
                "tool": "nnunetv2",
                "version": version("nnunetv2"),
                "torch": version("torch"),
                "npp": args.npp,
                "nps": args.nps,
                "plan": planned,
                "patch_used": plans["configurations"][CONFIGURATION]["patch_size"],
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
