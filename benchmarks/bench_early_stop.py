"""Benchmark early stopping on the demo phantom: a full-budget run against an ``--early-stop`` run.

Writes the demo's brain-tumour phantom (``autoseg demo``'s CPU data: MSD Task01 layout, training
cases plus held-out cases with their truth), plans it once, then trains fold 0 twice from the same
seed, one run after the other, both with real validation during training (``--val-every``):

1. the full budget (``--epochs`` × ``--iterations``);
2. the same command with ``--early-stop PATIENCE --early-stop-delta DELTA``.

Each run's ``checkpoint_final.pt`` (and ``checkpoint_best.pt``) then predicts the held-out cases
as ``autoseg predict`` does (mirror TTA) and ``evaluate`` scores them. Printed: the held-out Dice
(mean over the plan's scored classes, and per class) and the training iterations each run used;
the goal is an early-stopped Dice within 0.01 of the full run's with at most half its iterations.
Also printed: over the full run, the Spearman correlation of the real Dice (validation cases
predicted in full) with the pseudo-Dice of the same epochs (and with its moving average), and
the share of training time validation took. Prints ONE JSON object to stdout.

    python benchmarks/bench_early_stop.py --shape 24 28 24 --epochs 100 --iterations 10 --patience 5

The goal is about a budget longer than the data need (nnU-Net's 1000 epochs on an easy task), so
choose ``--epochs`` well past where the full run's real Dice levels off.

``--real DATA_DIR`` runs the same comparison on a real MSD task (``Task04_Hippocampus``) instead of the
phantom. The split, seeded by ``--seed``: the task's cases in a fixed random order; the first
``--held-out`` of them (default: a fifth) are kept out of training and planning as the held-out cases
(``imagesTs``/``labelsTs`` of an MSD folder written in the work folder, symlinks to the originals);
the next ``--cases`` (default: all the others) are the training dataset, whose fold 0 (autoseg's
five-fold split) trains both runs, its validation cases giving the real Dice during training.

    python benchmarks/bench_early_stop.py --real ../shared/data/Task04_Hippocampus --epochs 50 --iterations 25 \
        --val-every 2 --patience 5
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from real_msd import shuffled_cases, write_msd_subset
from scipy.stats import spearmanr

from autoseg.commands.demo import CPU_BUDGET, DATASET_NAME
from autoseg.commands.plan import plan_dataset
from autoseg.commands.predict import predict_folder
from autoseg.core.plan import load_plan
from autoseg.data.evaluation.evaluate import evaluate_folders
from autoseg.inference.predictor import Predictor
from autoseg.phantoms import synthetic
from autoseg.training.real_validation import RealDiceState
from autoseg.workflows.fold import train_and_validate


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real", type=Path, default=None, metavar="DATA_DIR", help="a real MSD task folder instead of the phantom"
    )
    parser.add_argument("--cases", type=int, default=None, help="training cases (default: the demo's; --real: all)")
    parser.add_argument(
        "--held-out", type=int, default=None, help="held-out cases (default: the demo's; --real: a fifth of the task)"
    )
    parser.add_argument("--shape", type=int, nargs=3, default=list(CPU_BUDGET.shape))
    parser.add_argument("--epochs", type=int, default=CPU_BUDGET.epochs)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--val-iterations", type=int, default=CPU_BUDGET.val_iterations)
    parser.add_argument("--val-every", type=int, default=None, help="default: train's own default")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--early-stop-delta", type=float, default=None, help="default: train's own default")
    parser.add_argument("--early-stop-cooldown", type=int, default=None, help="default: train's own default")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the training process (1: steady on a shared machine)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    return parser.parse_args()


def epochs_logged(folder: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in lines if "epoch" in e and "event" not in e], [e for e in lines if "event" in e]


def held_out_dice(work: Path, raw: Path, out: Path, checkpoint: str, classes: list[str]) -> dict:
    predictor = Predictor.from_workdir(work, folds=["0"], checkpoint=checkpoint, device="cpu")
    predict_folder(predictor, raw / "imagesTs", out, overwrite=True, show_progress=False)
    summary = evaluate_folders(
        predictions=out, truth=raw / "labelsTs", dataset_json=raw / "dataset.json", show_progress=False
    )
    per_class = {n: round(summary["mean"][n]["dice"], 4) for n in classes}
    return {"mean": round(float(np.mean(list(per_class.values()))), 4), "per_class": per_class}


def train(work: Path, args: argparse.Namespace, early_stop: int | None, delta: float | None) -> dict:
    started = time.perf_counter()
    result = train_and_validate(
        workdir=work,
        fold="0",
        epochs=args.epochs,
        iterations=args.iterations,
        val_iterations=args.val_iterations,
        val_every=args.val_every,
        early_stop=early_stop,
        early_stop_delta=delta,
        early_stop_cooldown=args.early_stop_cooldown if early_stop else None,
        workers=args.workers,
        seed=args.seed,
        device="cpu",
        resume=False,
        validate=False,
        show_progress=False,
    )
    epochs, events = epochs_logged(result.training.folder)
    validated = [e for e in epochs if "real_dice_mean" in e]
    stop = next((e for e in events if e["event"] == "early_stop"), None)
    cooled = next((e for e in events if e["event"] == "cooldown_end"), None)
    settings = next(e for e in events if e["event"] == "start")["settings"]
    return {
        "epochs_trained": len(epochs),
        "iterations": len(epochs) * args.iterations,
        "val_every": settings["val_every"],
        "early_stop_delta": settings["early_stop_delta"],
        "stopped_epoch": result.training.stopped_epoch,
        "early_stop_event": stop,
        "cooldown_end_event": cooled,
        "lr_last_epochs": [round(e["lr"], 6) for e in epochs[-3:]],
        "best_real_dice": max((e["real_dice_mean"] for e in validated), default=None),
        "validation_share_of_training_time": round(
            sum(e["real_dice_time_s"] for e in validated) / sum(e["epoch_time_s"] for e in epochs), 4
        ),
        "wall_s": round(time.perf_counter() - started, 1),
        "_validated": validated,
    }


def correlation(validated: list[dict]) -> dict:
    real = [e["real_dice_mean"] for e in validated]
    pseudo = [e["pseudo_dice_mean"] for e in validated]
    ema = [e["pseudo_dice_ema"] for e in validated]
    return {
        "validations": len(real),
        "spearman_pseudo_dice": round(float(spearmanr(pseudo, real).statistic), 3),
        "spearman_pseudo_dice_ema": round(float(spearmanr(ema, real).statistic), 3),
        "curve": [
            {
                "epoch": e["epoch"],
                "real": round(e["real_dice_mean"], 4),
                "pseudo": round(e["pseudo_dice_mean"], 4),
                "pseudo_ema": round(e["pseudo_dice_ema"], 4),
            }
            for e in validated
        ],
    }


def stop_epoch(validated: list[dict], patience: int, delta: float) -> int | None:
    """Where the stopping rule would end the full run's real-Dice curve (None: it would not): the
    early-stopped run trains the same epochs up to its stop, so this shows what the delta changed."""
    state = RealDiceState()
    for entry in validated:
        state.update(entry["real_dice_mean"], entry["epoch"], delta)
        if state.exhausted(patience):
            return entry["epoch"]
    return None


def real_dataset(args: argparse.Namespace, root: Path) -> tuple[Path, dict]:
    """The ``--real`` split (see the module's docstring) as an MSD folder under ``root``; it and its description."""
    order = shuffled_cases(args.real, args.seed)
    n_held_out = args.held_out if args.held_out is not None else len(order) // 5
    held_out = sorted(order[:n_held_out])
    training = sorted(order[n_held_out:][: args.cases] if args.cases is not None else order[n_held_out:])
    raw = write_msd_subset(args.real, root / Path(args.real).resolve().name, training, held_out)
    split = f"seeded order (seed {args.seed}): first {n_held_out} held out, next {len(training)} train (fold 0)"
    return raw, {"real": str(args.real), "cases": len(training), "held_out": held_out, "split": split}


def phantom_dataset(args: argparse.Namespace, root: Path) -> tuple[Path, dict]:
    """The demo's brain-tumour phantom with its held-out cases; it and its description."""
    cases = args.cases if args.cases is not None else CPU_BUDGET.cases
    held_out = args.held_out if args.held_out is not None else CPU_BUDGET.held_out
    raw = synthetic.write_msd_brain(
        root / DATASET_NAME,
        cases,
        shape=tuple(args.shape),
        spacing=(CPU_BUDGET.spacing_mm,) * 3,
        seed=args.seed,
        n_test=held_out,
    )
    return raw, {"cases": cases, "held_out": held_out, "shape": args.shape, "spacing_mm": CPU_BUDGET.spacing_mm}


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-early-stop-"))
    try:
        raw, data = real_dataset(args, root) if args.real is not None else phantom_dataset(args, root)
        full_work, early_work = root / "work_full", root / "work_early"
        plan_dataset(dataset_dir=raw, workdir=full_work, configurations=["3d_fullres"], show_progress=False)
        shutil.copytree(full_work, early_work)
        classes = load_plan(full_work / raw.name / "plans.json").scored_classes
        runs = {}
        for name, work, patience in (("full", full_work, None), ("early_stop", early_work, args.patience)):
            print(f"training {name}", file=sys.stderr, flush=True)
            runs[name] = train(work, args, patience, args.early_stop_delta if patience else None)
            for checkpoint in ("final", "best"):
                runs[name][f"held_out_dice_{checkpoint}"] = held_out_dice(
                    work, raw, root / f"predictions_{name}_{checkpoint}", checkpoint, classes
                )
        validated = runs["full"].pop("_validated")
        curve = correlation(validated)
        runs["early_stop"].pop("_validated")
        full, early = runs["full"], runs["early_stop"]
        curve["stop_epoch_on_this_curve"] = {
            f"delta {d:g}": stop_epoch(validated, args.patience, d) for d in sorted({0.0, early["early_stop_delta"]})
        }
        print(
            json.dumps(
                {
                    "data": data,
                    "budget": {
                        "epochs": args.epochs,
                        "iterations": args.iterations,
                        "val_iterations": args.val_iterations,
                        "patience": args.patience,
                        "early_stop_delta": early["early_stop_delta"],
                        "early_stop_cooldown": args.early_stop_cooldown,
                        "seed": args.seed,
                        "workers": args.workers,
                        "threads": args.threads,
                    },
                    "runs": runs,
                    "goal": {
                        "dice_difference_final": round(
                            early["held_out_dice_final"]["mean"] - full["held_out_dice_final"]["mean"], 4
                        ),
                        "iteration_share": round(early["iterations"] / full["iterations"], 3),
                        "met": bool(
                            early["held_out_dice_final"]["mean"] >= full["held_out_dice_final"]["mean"] - 0.01
                            and early["iterations"] <= 0.5 * full["iterations"]
                        ),
                    },
                    "pseudo_vs_real_dice": curve,
                },
                indent=1,
            )
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
