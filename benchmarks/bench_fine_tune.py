"""Benchmark fine-tuning across plans: a model of one phantom task, fine-tuned on a second task with other
channels and labels, against training that second task from scratch.

Task A (the "public" model): the demo's brain-tumour phantom in the MSD Task01 layout, four channels
(FLAIR, T1w, T1gd, T2w) and three labels (edema, non-enhancing tumour, enhancing tumour); planned and
trained on every case (fold ``all``) for ``--source-epochs`` × ``--iterations``.

Task B (the "hospital"): other phantom cases (another seed) in the nnU-Net v2 layout with three channels
in another order (T2w, FLAIR, T1gd: no T1w) and two other classes (edema; tumour core = non-enhancing
and enhancing merged), fewer training cases, and held-out cases with their truth. Trained on every
training case (fold ``all``) three ways, each as the commands do it:

1. ``scratch_100``: ``autoseg plan`` on B alone, then ``train`` for the full budget
   (``--epochs`` × ``--iterations``);
2. ``fine_tuned_20``: ``autoseg plan --like A``, then ``train --pretrained A`` for ``--fraction`` of the
   epochs (same iterations per epoch; warm-up, encoder freeze and heads-first epochs as given, else
   train's defaults: the heads' background and edema rows come from A's, tumour core's start fresh,
   and the heads train alone for the first epoch);
3. ``scratch_20``: the scratch plan trained for the same short budget (what the pretrained weights add).

Each model predicts B's held-out cases in full as ``autoseg predict`` does (mirror TTA) and
``evaluate`` scores them. Printed: mean Dice per class and over classes, the training iterations of
each run, and whether the goal holds (fine-tuned at 20 % >= scratch at 100 %, mean over classes).
Measures Dice and iterations, not time. Prints ONE JSON object to stdout.

    python benchmarks/bench_fine_tune.py --shape 32 40 32 --epochs 30 --iterations 20

``--real DATA_DIR`` runs a transfer that happens in practice on a real MSD task (``Task04_Hippocampus``)
instead of the phantoms. The task's cases in a fixed random order (``--seed``) are cut in half:

- A: the first half (or its first ``--source-cases``), labels 1 and 2 merged into one class
  ``hippocampus`` (label files rewritten, images symlinked), an MSD folder ``Task904_HippocampusMerged``;
- B: from the second half, the first ``--cases`` (default 20) with their own labels (anterior,
  posterior) train, and the next ``--held-out`` (default: all the others) are held out
  (``imagesTs``/``labelsTs`` of ``Task905_HippocampusTarget``, never planned or trained on).

The same three runs follow (both B models see the same 20 cases; channels match, so every weight but the
output heads' anterior and posterior rows comes from A).

    python benchmarks/bench_fine_tune.py --real ../shared/data/Task04_Hippocampus --epochs 50 --iterations 25
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from real_msd import shuffled_cases, write_msd_subset

from autoseg.commands.demo import CPU_BUDGET
from autoseg.commands.plan import plan_dataset
from autoseg.commands.predict import predict_folder
from autoseg.core.plan import load_plan
from autoseg.data.evaluation.evaluate import evaluate_folders
from autoseg.inference.predictor import Predictor
from autoseg.phantoms import synthetic
from autoseg.workflows.fold import load_pretrained, train_and_validate

REPO = Path(__file__).resolve().parents[1]
SOURCE_NAME = "Task01_BrainTumour"
TARGET_NAME = "Dataset502_Hospital"
TARGET_CHANNELS = ("T2w", "FLAIR", "T1gd")
TARGET_LABELS = {"edema": [1], "tumour core": [2, 3]}
FOLD = "all"
REAL_SOURCE = "Task904_HippocampusMerged"
REAL_TARGET = "Task905_HippocampusTarget"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real", type=Path, default=None, metavar="DATA_DIR", help="a real MSD task folder instead of the phantoms"
    )
    parser.add_argument(
        "--source-cases", type=int, default=None, help="task A training cases (default: the demo's; --real: a half)"
    )
    parser.add_argument("--cases", type=int, default=None, help="task B training cases (default: 8; --real: 20)")
    parser.add_argument(
        "--held-out", type=int, default=None, help="task B held-out cases (default: the demo's; --real: the rest)"
    )
    parser.add_argument("--shape", type=int, nargs=3, default=list(CPU_BUDGET.shape))
    parser.add_argument("--spacing", type=float, default=CPU_BUDGET.spacing_mm, help="isotropic, mm")
    parser.add_argument("--source-epochs", type=int, default=None, help="task A's budget (default: --epochs)")
    parser.add_argument("--epochs", type=int, default=30, help="task B's full budget")
    parser.add_argument("--iterations", type=int, default=CPU_BUDGET.iterations)
    parser.add_argument("--val-iterations", type=int, default=CPU_BUDGET.val_iterations)
    parser.add_argument("--fraction", type=float, default=0.2, help="fine-tuning budget, share of --epochs")
    parser.add_argument("--warmup-epochs", type=int, default=None, help="default: train's own default")
    parser.add_argument("--freeze-encoder-epochs", type=int, default=None, help="default: train's own default")
    parser.add_argument("--heads-first-epochs", type=int, default=None, help="default: train's own default")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seeds the phantoms (A: seed, B: seed+1) and training")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady on a shared machine, where more threads contend)",
    )
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    return parser.parse_args()


def code_state() -> dict:
    """The commit measured, and whether autoseg/ differs from it."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "autoseg_modified": bool(git("status", "--porcelain", "--", "autoseg")),
    }


def note(message: str) -> None:
    print(f"[bench_fine_tune] {message}", file=sys.stderr, flush=True)


def train(work: Path, args: argparse.Namespace, epochs: int, **fine_tuning) -> dict:
    """``autoseg train --fold all --no-validate`` with this budget; returns what the run logged."""
    result = train_and_validate(
        workdir=work,
        fold=FOLD,
        epochs=epochs,
        iterations=args.iterations,
        val_iterations=args.val_iterations,
        workers=args.workers,
        seed=args.seed,
        device="cpu",
        resume=False,
        validate=False,
        show_progress=False,
        **fine_tuning,
    )
    lines = [json.loads(line) for line in (result.training.folder / "log.jsonl").read_text().splitlines() if line]
    epochs_logged = [e for e in lines if "epoch" in e and "event" not in e]
    start = next(e for e in lines if e.get("event") == "start")["settings"]
    loaded = next((e for e in lines if e.get("event") == "pretrained"), None)
    run = {
        "epochs": len(epochs_logged),
        "iterations": len(epochs_logged) * args.iterations,
        "warmup_epochs": start["warmup_epochs"],
        "freeze_encoder_epochs": start["freeze_encoder_epochs"],
        "heads_first_epochs": start["heads_first_epochs"],
        "pseudo_dice": [round(e["pseudo_dice_mean"], 4) for e in epochs_logged],
        "final_pseudo_dice": round(epochs_logged[-1]["pseudo_dice_mean"], 4),
    }
    if loaded is not None:
        run["pretrained"] = {
            k: loaded[k] for k in ("loaded", "adapted", "reinitialised", "classes_copied", "classes_fresh", "notes")
        }
    return run


def held_out_dice(work: Path, raw: Path, out: Path) -> dict:
    """``autoseg predict`` (mirror TTA) of the held-out cases, then ``autoseg evaluate``."""
    predictor = Predictor.from_workdir(work, folds=[FOLD], device="cpu")
    predict_folder(predictor, raw / "imagesTs", out, overwrite=True, show_progress=False)
    summary = evaluate_folders(
        predictions=out, truth=raw / "labelsTs", dataset_json=raw / "dataset.json", show_progress=False
    )
    classes = load_plan(next(work.glob("*/plans.json"))).scored_classes
    per_class = {n: round(summary["mean"][n]["dice"], 4) for n in classes}
    return {"mean": round(float(np.mean(list(per_class.values()))), 4), "per_class": per_class}


def real_datasets(args: argparse.Namespace, root: Path) -> tuple[Path, Path, dict]:
    """The ``--real`` tasks A and B (see the module's docstring) as MSD folders under ``root``."""
    order = shuffled_cases(args.real, args.seed)
    half = len(order) // 2
    source_cases = sorted(order[:half][: args.source_cases] if args.source_cases is not None else order[:half])
    n_target = args.cases if args.cases is not None else 20
    target_cases = sorted(order[half:][:n_target])
    rest = order[half:][n_target:]
    held_out = sorted(rest[: args.held_out] if args.held_out is not None else rest)
    source = write_msd_subset(args.real, root / REAL_SOURCE, source_cases, merge={"hippocampus": [1, 2]})
    target = write_msd_subset(args.real, root / REAL_TARGET, target_cases, held_out)
    data = {
        "real": str(args.real),
        "split": f"seeded order (seed {args.seed}) cut in half: A from the first, B and its held-out from the second",
        "source": {"name": REAL_SOURCE, "cases": len(source_cases), "merged": "labels 1 and 2 as hippocampus"},
        "target": {"name": REAL_TARGET, "cases": target_cases, "held_out": len(held_out)},
    }
    return source, target, data


def phantom_datasets(args: argparse.Namespace, root: Path) -> tuple[Path, Path, dict]:
    """Tasks A and B as phantoms (see the module's docstring)."""
    shape, spacing = tuple(args.shape), (args.spacing,) * 3
    source_cases = args.source_cases if args.source_cases is not None else CPU_BUDGET.cases
    cases = args.cases if args.cases is not None else 8
    held_out = args.held_out if args.held_out is not None else CPU_BUDGET.held_out
    source = synthetic.write_msd_brain(root / SOURCE_NAME, source_cases, shape=shape, spacing=spacing, seed=args.seed)
    target = synthetic.write_nnunet_brain(
        root / TARGET_NAME,
        cases,
        shape=shape,
        spacing=spacing,
        seed=args.seed + 1,
        channels=TARGET_CHANNELS,
        labels=TARGET_LABELS,
        n_test=held_out,
    )
    data = {
        "source": {"cases": source_cases},
        "target": {"cases": cases, "held_out": held_out},
        "shape": args.shape,
        "spacing_mm": args.spacing,
    }
    return source, target, data


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    short = max(1, round(args.epochs * args.fraction))
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-fine-tune-"))
    try:
        source, target, data = real_datasets(args, root) if args.real is not None else phantom_datasets(args, root)
        source_work, scratch_work, tuned_work = root / "work_source", root / "work_scratch", root / "work_tuned"
        note("planning A, B and B --like A")
        plan_dataset(dataset_dir=source, workdir=source_work, configurations=["3d_fullres"], show_progress=False)
        plan_dataset(dataset_dir=target, workdir=scratch_work, configurations=["3d_fullres"], show_progress=False)
        plan_dataset(dataset_dir=target, workdir=tuned_work, like=source_work, show_progress=False)
        scratch_short_work = root / "work_scratch_short"
        shutil.copytree(scratch_work, scratch_short_work)

        note("training the source model on A")
        runs = {"source": train(source_work, args, args.source_epochs or args.epochs)}
        plan_a = load_plan(source_work / source.name / "plans.json")
        plan_b = load_plan(scratch_work / target.name / "plans.json")
        plans = {"A": plan_a.configurations["3d_fullres"], "B": plan_b.configurations["3d_fullres"]}
        data["source"] |= {"channels": list(plan_a.channel_names), "classes": plan_a.scored_classes}
        data["target"] |= {"channels": list(plan_b.channel_names), "classes": plan_b.scored_classes}
        runs["source"]["held_out_note"] = "A has no held-out cases here; its pseudo-Dice only"
        pretrained = load_pretrained(source_work)
        for name, work, epochs, extra in (
            ("scratch_100", scratch_work, args.epochs, {}),
            (
                "fine_tuned_20",
                tuned_work,
                short,
                {
                    "pretrained": pretrained,
                    "warmup_epochs": args.warmup_epochs,
                    "freeze_encoder_epochs": args.freeze_encoder_epochs,
                    "heads_first_epochs": args.heads_first_epochs,
                },
            ),
            ("scratch_20", scratch_short_work, short, {}),
        ):
            note(f"training {name} on B ({epochs} epochs)")
            runs[name] = train(work, args, epochs, **extra)
            runs[name]["held_out_dice"] = held_out_dice(work, target, root / f"predictions_{name}")
        tuned, scratch = runs["fine_tuned_20"], runs["scratch_100"]
        print(
            json.dumps(
                {
                    "code": code_state(),
                    "data": data,
                    "plans": {
                        k: {
                            "patch": list(c.patch_size),
                            "batch": c.batch_size,
                            "spacing": list(c.spacing),
                            "stages": c.network.n_stages,
                        }
                        for k, c in plans.items()
                    },
                    "budget": {
                        "source_epochs": args.source_epochs or args.epochs,
                        "epochs": args.epochs,
                        "fine_tune_epochs": short,
                        "iterations": args.iterations,
                        "val_iterations": args.val_iterations,
                        "seed": args.seed,
                        "workers": args.workers,
                        "threads": args.threads,
                    },
                    "runs": runs,
                    "goal": {
                        "fine_tuned_minus_scratch": round(
                            tuned["held_out_dice"]["mean"] - scratch["held_out_dice"]["mean"], 4
                        ),
                        "iteration_share": round(tuned["iterations"] / scratch["iterations"], 3),
                        "met": bool(
                            tuned["held_out_dice"]["mean"] >= scratch["held_out_dice"]["mean"]
                            and tuned["iterations"] <= args.fraction * scratch["iterations"] + 1e-9
                        ),
                    },
                },
                indent=1,
            )
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
