"""Time nnU-Net v2's plan-and-preprocess on a raw dataset, for side-by-side benchmarks with autoseg.

Run with the nnU-Net venv's python (benchmarks/nnunet_env.sh installs nnunetv2 and psutil there):

    .bench/nnunet-venv/bin/python benchmarks/nnunet_plan_timing.py \
        --raw DIR/Dataset123_Name --work SCRATCH -j 2 [--configs 3d_fullres ...]

Two runs, each on a freshly emptied scratch tree (SCRATCH/oneshot, SCRATCH/staged) whose
nnUNet_raw holds a symlink to the dataset:

* one-shot: ``nnUNetv2_plan_and_preprocess`` -> ``total_s``, peak RSS and the plans reported;
* staged: ``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``, ``nnUNetv2_preprocess``
  one after another -> ``fingerprint_s``, ``plan_s``, ``preprocess_s``. Each step is its own
  process, so each includes a Python + torch start-up (~2-3 s) that the one-shot run pays once;
  their sum is therefore a little above ``total_s``.

Peak RSS of the one-shot process tree is sampled with psutil every POLL_S seconds:
``peak_rss_sum_bytes`` is the largest sum over the live tree at one sample (it counts pages
shared between processes once per process), ``peak_rss_max_process_bytes`` the largest single
process, raised to the kernel's exact ru_maxrss of reaped children when polling missed a spike.
ONE JSON object goes to stdout; nnU-Net's output and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil

POLL_S = 0.1


@dataclass
class RunResult:
    """Wall time and sampled memory peaks of one command's process tree."""

    wall_s: float
    peak_rss_max_process_bytes: int
    peak_rss_sum_bytes: int


def prepare_scratch(work: Path, raw_dataset: Path) -> dict[str, str]:
    """Empty ``work``, link the dataset into its nnUNet_raw and return nnU-Net's three path variables."""
    shutil.rmtree(work, ignore_errors=True)
    paths = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        p.mkdir(parents=True)
    (paths["nnUNet_raw"] / raw_dataset.name).symlink_to(raw_dataset, target_is_directory=True)
    return {k: str(v) for k, v in paths.items()}


def tree_rss(root: psutil.Process) -> list[int]:
    """RSS of ``root`` and every live descendant; processes that exit mid-sample are skipped."""
    rss = []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return rss
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss


def run_measured(cmd: list[str], nnunet_paths: dict[str, str]) -> RunResult:
    """Run one nnU-Net command with its path variables set for it alone, polling its tree's RSS."""
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, **nnunet_paths}
    max_proc = max_sum = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        rss = tree_rss(root)
        if rss:
            max_proc = max(max_proc, max(rss))
            max_sum = max(max_sum, sum(rss))
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return RunResult(wall, max_proc, max_sum)


def summarize_plans(plans_file: Path, configs: list[str]) -> dict[str, Any]:
    """The plan fields we compare with autoseg, for the requested configurations nnU-Net produced."""
    plans = json.loads(plans_file.read_text())
    out = {}
    for c in configs:
        conf = plans["configurations"].get(c)
        if conf is None:
            continue
        out[c] = {
            "patch_size": conf["patch_size"],
            "batch_size": conf["batch_size"],
            "spacing": conf["spacing"],
            "n_stages": conf["architecture"]["arch_kwargs"]["n_stages"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="dataset in nnU-Net v2 raw layout (DatasetXXX_Name)")
    parser.add_argument("--work", type=Path, required=True, help="scratch dir (its oneshot/ and staged/ are wiped)")
    parser.add_argument("-j", type=int, default=os.cpu_count(), help="processes for fingerprint and preprocessing")
    parser.add_argument("--configs", nargs="+", default=["3d_fullres"])
    args = parser.parse_args()

    raw = args.raw.resolve()
    m = re.fullmatch(r"Dataset(\d{3})_.+", raw.name)
    if m is None:
        parser.error(f"--raw must be a folder named DatasetXXX_Name, got {raw.name!r}")
    dataset_id = str(int(m.group(1)))
    file_ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    n_cases = len(list((raw / "labelsTr").glob(f"*{file_ending}")))
    bin_dir = Path(sys.executable).parent
    n = str(args.j)
    work = args.work.resolve()

    # One-shot first, so RUSAGE_CHILDREN's ru_maxrss (kB on Linux) below reflects only this run.
    oneshot_paths = prepare_scratch(work / "oneshot", raw)
    total = run_measured(
        [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", *args.configs, "-np", n, "-npfp", n],
        oneshot_paths,
    )
    exact_max_proc = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    staged_paths = prepare_scratch(work / "staged", raw)
    fingerprint = run_measured(
        [str(bin_dir / "nnUNetv2_extract_fingerprint"), "-d", dataset_id, "-np", n], staged_paths
    )
    plan = run_measured([str(bin_dir / "nnUNetv2_plan_experiment"), "-d", dataset_id], staged_paths)
    preprocess = run_measured(
        [str(bin_dir / "nnUNetv2_preprocess"), "-d", dataset_id, "-c", *args.configs, "-np", n], staged_paths
    )

    plans_file = Path(oneshot_paths["nnUNet_preprocessed"]) / raw.name / "nnUNetPlans.json"
    print(
        json.dumps(
            {
                "tool": "nnunetv2",
                "version": version("nnunetv2"),
                "cases": n_cases,
                "processes": args.j,
                "total_s": round(total.wall_s, 3),
                "fingerprint_s": round(fingerprint.wall_s, 3),
                "plan_s": round(plan.wall_s, 3),
                "preprocess_s": round(preprocess.wall_s, 3),
                "peak_rss_max_process_bytes": max(total.peak_rss_max_process_bytes, exact_max_proc),
                "peak_rss_sum_bytes": total.peak_rss_sum_bytes,
                "plans": summarize_plans(plans_file, args.configs),
            }
        )
    )


if __name__ == "__main__":
    main()
