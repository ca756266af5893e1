"""Benchmark `autoseg plan` against `nnUNetv2_plan_and_preprocess`, side by side, same data.

Writes a brain-tumour phantom dataset in the nnU-Net v2 layout (which both tools read),
runs both planners with the same number of processes and prints one JSON object:
cases/s for fingerprinting and preprocessing, wall time, peak worker memory and the
speed ratio. nnU-Net runs from its own virtual environment (benchmarks/nnunet_env.sh).

    bash benchmarks/nnunet_env.sh                      # once
    python benchmarks/bench_plan.py --cases 20 --shape 155 240 240 -j 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NNUNET_PYTHON = REPO / ".bench" / "nnunet-venv" / "bin" / "python"

AUTOSEG_CHILD = """
import json, sys
from pathlib import Path
from autoseg.commands.plan import plan_dataset
r = plan_dataset(dataset_dir=Path(sys.argv[1]), workdir=Path(sys.argv[2]), workers=int(sys.argv[3]),
                 configurations=["3d_fullres"], show_progress=False)
print(json.dumps({"timings": r.timings, "peak_worker_rss_bytes": r.peak_worker_rss_bytes,
                  "peak_worker_work_bytes": r.peak_worker_work_bytes,
                  "plan": {n: {"patch_size": c.patch_size, "batch_size": c.batch_size, "spacing": c.spacing,
                               "n_stages": c.network.n_stages} for n, c in r.plan.configurations.items()}}))
"""


def write_dataset(root: Path, cases: int, shape: list[int], kind: str) -> Path:
    from autoseg.phantoms import synthetic

    if kind == "brain":
        return synthetic.write_nnunet_brain(root, cases, shape=tuple(shape))
    return synthetic.write_nnunet_ct(root, cases, shape=tuple(shape))


def run_autoseg(dataset: Path, work: Path, workers: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", AUTOSEG_CHILD, str(dataset), str(work), str(workers)],
        check=True,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - start
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["total_s"] = total
    return result


def run_nnunet(python: Path, dataset: Path, work: Path, workers: int) -> dict:
    out = subprocess.run(
        [
            str(python),
            str(REPO / "benchmarks" / "nnunet_plan_timing.py"),
            "--raw",
            str(dataset),
            "--work",
            str(work),
            "-j",
            str(workers),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[155, 240, 240], help="z y x of each case")
    parser.add_argument("--kind", choices=["brain", "ct"], default="brain")
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    parser.add_argument("--skip-nnunet", action="store_true")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    try:
        dataset = write_dataset(scratch / "Dataset901_BenchBrain", args.cases, args.shape, args.kind)
        n_channels = len(json.loads((dataset / "dataset.json").read_text())["channel_names"])
        case_bytes = 4 * n_channels * args.shape[0] * args.shape[1] * args.shape[2]
        ours = run_autoseg(dataset, scratch / "autoseg_work", args.workers)
        t = ours["timings"]
        report = {
            "benchmark": "plan",
            "cases": args.cases,
            "shape": args.shape,
            "kind": args.kind,
            "workers": args.workers,
            "case_float32_bytes": case_bytes,
            "autoseg": {
                "total_s": round(ours["total_s"], 2),
                "fingerprint_cases_per_s": round(args.cases / (t["hash_s"] + t["fingerprint_s"]), 3),
                "preprocess_cases_per_s": round(args.cases / t["preprocess_s"], 3),
                "timings_s": {k: round(v, 2) for k, v in t.items()},
                "peak_worker_rss_bytes": ours["peak_worker_rss_bytes"],
                "peak_worker_work_bytes": ours["peak_worker_work_bytes"],
                "peak_worker_work_per_case_bytes": round(ours["peak_worker_work_bytes"] / case_bytes, 2),
                "plan": ours["plan"],
            },
        }
        if not args.skip_nnunet:
            theirs = run_nnunet(args.nnunet_python, dataset, scratch / "nnunet_work", args.workers)
            report["nnunet"] = theirs
            report["speedup_total"] = round(theirs["total_s"] / ours["total_s"], 2)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
