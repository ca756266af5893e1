"""Benchmark active learning with ``autoseg rank``: label the scans it ranks least confident, or scans drawn at
random, and compare the held-out Dice of the models trained on each.

For every seed, the cases of an MSD dataset (e.g. Task04_Hippocampus) are shuffled and split into a held-out
set (truth known, never trained on), ``--initial`` labelled cases and an unlabelled pool of ``--pool`` cases:

1. ``initial``: plan the labelled cases and train fold ``all`` with the budget (``--epochs`` × ``--iterations``);
   predict and score the held-out set;
2. ``autoseg rank`` the pool with that model (uncertainty estimate; scans out of distribution listed apart
   are not chosen) and take the ``--add`` least confident;
3. ``ranked``: the initial cases plus those, planned and trained from scratch with the same budget;
   ``random``: the initial cases plus ``--add`` pool cases drawn at random (same seed), the same way;
   with ``--continue-epochs N`` both arms instead go on from the initial model as a user would after
   labelling: ``autoseg plan`` again with the added cases, then ``train --fold all --continue --epochs N``
   (same iterations per epoch). Both arms then start from the same weights, so the initial draw, which
   decides when a short run leaves the background-only plateau (docs/real-data.md), cancels out;
4. both predict the held-out set as ``autoseg predict`` does and ``evaluate`` scores them.

Printed: ONE JSON object (per seed the held-out mean Dice of each model and the cases chosen; over the seeds
the mean of ranked − random and whether ranked beats random). Timing is not measured.

    python benchmarks/bench_active_learning.py ../shared/data/Task04_Hippocampus --seeds 0 1 2
    python benchmarks/bench_active_learning.py DATA --initial 5 --add 2 --pool 4 --held-out 2 \\
        --epochs 2 --iterations 2 --seeds 0          # a smoke run: checks the wiring, measures nothing
    python benchmarks/bench_active_learning.py DATA --epochs 12 --iterations 25 --continue-epochs 6 --seeds 3
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

from autoseg.commands.plan import plan_dataset
from autoseg.commands.predict import PredictOptions, predict_folder
from autoseg.commands.rank import rank
from autoseg.core.files import read_json, write_json
from autoseg.core.plan import load_plan
from autoseg.data.evaluation.evaluate import evaluate_folders
from autoseg.inference.predictor import Predictor
from autoseg.training.trainer import train_fold
from autoseg.workflows.continuation import continue_fold

REPO = Path(__file__).resolve().parents[1]
FOLD = "all"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="an MSD dataset folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--initial", type=int, default=20, help="labelled cases the first model learns from")
    parser.add_argument("--add", type=int, default=10, help="cases labelled next: ranked or at random")
    parser.add_argument("--pool", type=int, default=60, help="unlabelled cases rank chooses from")
    parser.add_argument("--held-out", type=int, default=40, help="cases scored, never trained on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one split and training per seed")
    parser.add_argument("--epochs", type=int, default=50, help="the budget of every model")
    parser.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    parser.add_argument(
        "--continue-epochs", type=int, default=0, help="0: arms train from scratch; N: arms continue the initial model"
    )
    parser.add_argument("--val-iterations", type=int, default=2)
    parser.add_argument("--tta", action="store_true", help="mirror TTA when predicting (default: off, faster)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    args = parser.parse_args()
    if args.initial < 5:
        parser.error("--initial must be at least 5: plan writes five cross-validation folds")
    return args


def note(message: str) -> None:
    print(f"[bench_active_learning] {message}", file=sys.stderr, flush=True)


def code_state() -> dict:
    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "autoseg_modified": bool(git("status", "-s", "autoseg")),
    }


def msd_cases(data: Path) -> list[dict]:
    """dataset.json's training entries whose image and label exist, with the case id (the file name's stem)."""
    record = read_json(data / "dataset.json")
    cases = []
    for entry in record["training"]:
        image, label = data / entry["image"], data / entry["label"]
        if image.is_file() and label.is_file():
            cases.append({"id": image.name.removesuffix(".nii.gz"), "image": image, "label": label})
    return cases


def write_subset(data: Path, cases: list[dict], folder: Path) -> Path:
    """An MSD dataset of ``cases`` (links to the files) with dataset.json's names, for ``autoseg plan``."""
    record = read_json(data / "dataset.json")
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / "imagesTr" / case["image"].name).symlink_to(case["image"].resolve())
        (folder / "labelsTr" / case["label"].name).symlink_to(case["label"].resolve())
    training = [{"image": f"./imagesTr/{c['image'].name}", "label": f"./labelsTr/{c['label'].name}"} for c in cases]
    write_json(folder / "dataset.json", record | {"training": training, "numTraining": len(cases), "test": []})
    return folder


def image_folder(cases: list[dict], folder: Path, labels: bool = False) -> Path:
    folder.mkdir(parents=True)
    for case in cases:
        source = case["label" if labels else "image"]
        (folder / source.name).symlink_to(source.resolve())
    return folder


def train_model(
    dataset: Path, work: Path, args: argparse.Namespace, seed: int, continue_from: Path | None = None
) -> None:
    """``autoseg plan`` then ``autoseg train --fold all`` with the budget; with ``continue_from`` (a trained work
    folder) its copy planned again with the added cases, then ``train --fold all --continue``."""
    if continue_from is not None:
        shutil.copytree(continue_from, work, symlinks=True)
    plan_dataset(
        dataset_dir=dataset, workdir=work, workers=args.workers, configurations=["3d_fullres"], show_progress=False
    )
    budget = {"iterations": args.iterations, "val_iterations": args.val_iterations, "workers": args.workers}
    run = {"workdir": work, "fold": FOLD, "seed": seed, "device": "cpu", "resume": False, "show_progress": False}
    if continue_from is None:
        train_fold(epochs=args.epochs, **budget, **run)
    else:
        continue_fold(epochs=args.continue_epochs, validate=False, **budget, **run)


def held_out_dice(work: Path, images: Path, truth: Path, out: Path, tta: bool, names: Path) -> dict:
    """``autoseg predict`` of the held-out cases, then ``autoseg evaluate``: mean Dice per class and over them."""
    predictor = Predictor.from_workdir(work, folds=[FOLD], device="cpu", tta=tta)
    predict_folder(predictor, images, out, overwrite=True, show_progress=False)
    summary = evaluate_folders(predictions=out, truth=truth, dataset_json=names, show_progress=False)
    classes = [n for n, c in summary["classes"].items() if c["kind"] == "label"]
    per_class = {n: round(summary["mean"][n]["dice"], 4) for n in classes}
    return {"mean": round(float(np.mean(list(per_class.values()))), 4), "per_class": per_class}


def one_seed(args: argparse.Namespace, cases: list[dict], seed: int, root: Path) -> dict:
    """Split, train the initial model, rank its pool, train ranked and random, score all three."""
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(len(cases))]
    held, initial = order[: args.held_out], order[args.held_out : args.held_out + args.initial]
    pool = order[args.held_out + args.initial : args.held_out + args.initial + args.pool]
    images, truth = image_folder(held, root / "held_out_images"), image_folder(held, root / "held_out_truth", True)
    names = args.data / "dataset.json"  # MSD: its label names score the classes by name
    name = read_json(names).get("name", "Dataset")
    note(f"seed {seed}: initial model on {len(initial)} cases")
    train_model(
        write_subset(args.data, initial, root / "initial" / f"Task99_{name}"), root / "work_initial", args, seed
    )
    result = {"initial": held_out_dice(root / "work_initial", images, truth, root / "pred_initial", args.tta, names)}
    note(f"seed {seed}: ranking {len(pool)} pool cases")
    ranking = rank(
        PredictOptions(
            input=image_folder(pool, root / "pool"),
            output=root / "ranked",
            workdir=root / "work_initial",
            folds=(FOLD,),
            device="cpu",
            mirror=args.tta,
            show_progress=False,
        )
    )
    by_id = {c["id"]: c for c in pool}
    chosen = {
        "ranked": [by_id[r.case] for r in ranking.ranked[: args.add]],
        "random": [pool[i] for i in rng.choice(len(pool), size=min(args.add, len(pool)), replace=False)],
    }
    result["out_of_distribution"] = [r.case for r in ranking.apart]
    result["pool_ranking"] = [[r.case, r.estimated_dice] for r in ranking.ranked]
    for arm, added in chosen.items():
        note(f"seed {seed}: {arm} model on {len(initial) + len(added)} cases")
        work, dataset = root / f"work_{arm}", write_subset(args.data, initial + added, root / arm / f"Task99_{name}")
        train_model(dataset, work, args, seed, root / "work_initial" if args.continue_epochs else None)
        result[arm] = held_out_dice(work, images, truth, root / f"pred_{arm}", args.tta, names) | {
            "added": [c["id"] for c in added]
        }
    result["ranked_minus_random"] = round(result["ranked"]["mean"] - result["random"]["mean"], 4)
    return result


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    cases = msd_cases(args.data)
    needed = args.held_out + args.initial + args.pool
    if len(cases) < needed or args.add > args.pool:
        sys.exit(f"{args.data} has {len(cases)} labelled cases; the split needs {needed} and --add <= --pool")
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-active-learning-"))
    seeds = {str(seed): one_seed(args, cases, seed, root / f"seed_{seed}") for seed in args.seeds}
    gains = [s["ranked_minus_random"] for s in seeds.values()]
    plan = load_plan(next((root / f"seed_{args.seeds[0]}" / "work_initial").glob("*/plans.json")))
    report = {
        "code": code_state(),
        "data": {"folder": str(args.data), "cases": len(cases), "classes": plan.scored_classes},
        "split": {"initial": args.initial, "add": args.add, "pool": args.pool, "held_out": args.held_out},
        "budget": {
            "epochs": args.epochs,
            "iterations": args.iterations,
            "val_iterations": args.val_iterations,
            "arms": f"continue the initial model for {args.continue_epochs} epochs"
            if args.continue_epochs
            else "trained from scratch",
            "tta": args.tta,
            "threads": args.threads,
            "workers": args.workers,
        },
        "seeds": seeds,
        "ranked_minus_random": {"mean": round(float(np.mean(gains)), 4), "per_seed": gains},
        "ranked_beats_random": bool(np.mean(gains) > 0),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
