"""Calibration and the estimated Dice of a trained fold, measured on its held-out validation cases.

``autoseg select`` measures both on the pooled cross-validation of every fold; a real-data run
on 2 CPU cores trains one fold (``bench_real.py --keep DIR``). This script applies select's own
code (the voxel samples near the structures, the temperature fitted on half the cases and
scored on the other, the per-structure Spearman correlation of estimated against true Dice) to
one fold's validation cases, so the figures are select's figures on fewer cases.

    python benchmarks/bench_real.py ../shared/data/Task04_Hippocampus --keep /tmp/bench_real
    python benchmarks/bench_calibration_real.py /tmp/bench_real/autoseg --fold 0

The fold's validation probabilities come from ``autoseg train --validate-only`` (run here when
they are missing). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="autoseg work folder with a trained fold")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--fold", type=int, default=0)
    return parser.parse_args()


def validated(args: argparse.Namespace, folder: Path) -> float:
    """Seconds spent validating the fold (0 when its probabilities were already there)."""
    if (folder / "summary.json").is_file():
        return 0.0
    start = time.perf_counter()
    command = ["autoseg", "train", "-w", str(args.workdir), "-c", args.configuration, "--fold", str(args.fold)]
    subprocess.run([*command, "--validate-only", "--no-progress"], check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def main() -> None:
    from autoseg.commands.select import _chosen_results, calibration_report, quality_estimate
    from autoseg.core.plan import load_plan
    from autoseg.core.workspace import find_dataset
    from autoseg.data.io.dataset_record import load_dataset_record
    from autoseg.data.io.splits import read_splits
    from autoseg.selection.crossval import CrossValidation

    args = arguments()
    workspace = find_dataset(args.workdir, args.dataset)
    folder = workspace.model(args.configuration, args.fold) / "validation"
    seconds = validated(args, folder)
    plan = load_plan(workspace.plans)
    spec = load_dataset_record(workspace.dataset_json)
    held_out = set(read_splits(workspace.splits, workspace.name)[args.fold]["val"])
    spec = dataclasses.replace(spec, cases=tuple(c for c in spec.cases if c.case_id in held_out))
    fold = CrossValidation(args.configuration, (args.fold,), {c: folder / f"{c}.npz" for c in sorted(held_out)})
    cases, samples, dice_pairs = _chosen_results((args.configuration,), {args.configuration: fold}, plan, spec, False)
    dice = {name: float(np.mean([t for _, t in pairs])) for name, pairs in dice_pairs.items()}
    result = {
        "workdir": str(args.workdir),
        "configuration": args.configuration,
        "fold": args.fold,
        "cases": len(cases),
        "validate_seconds": round(seconds, 1),
        "true_dice_mean": dice,
        "calibration": calibration_report(samples),
        "estimated_dice": quality_estimate(dice_pairs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
