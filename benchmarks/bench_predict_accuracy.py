"""Accuracy of the faster prediction settings: Dice and network passes against the reference setting.

Writes the demo's brain-tumour phantom (MSD Task01 layout, training cases plus held-out cases with
their truth), plans it with a small ``--gpu-memory`` so that the patch is smaller than the cases
(each held-out case spans several tiles, so the step and skipping tiles matter), trains fold 0
briefly with the real training function, then predicts every held-out case with every setting:
precision {fp32, bf16} x TTA {8 mirrors, 4 (axes 0 1), 2 (axis 0), none, adaptive} x step
{0.5, 0.75}, each through :class:`autoseg.inference.predictor.Predictor` as ``autoseg predict``
does. Printed per setting: the network passes run and skipped (from ``report.json``), the Dice per
class against the truth (mean over cases), and the difference to the reference setting (fp32,
step 0.5, 8 mirrors) per class: the mean over cases and the worst case, and whether the setting
is within the tolerance of issue 13 (mean |difference| <= 0.002 and worst <= 0.005 for every class).

Differences are taken over the cases whose truth has the class: where the truth has none (every
fourth phantom has no enhancing tumour), Dice is 1 for an empty prediction and 0 for a single
voxel, a jump that says nothing about the setting; those cases are counted apart
(``empty_truth_changed``: cases where the setting and the reference disagree on emptiness).

Prints ONE JSON object to stdout. ``--keep DIR`` keeps the data, the plan and the trained model
there and reuses them on the next run (training is skipped when fold 0 has a final checkpoint).

    python benchmarks/bench_predict_accuracy.py --threads 1 --keep /tmp/bench-accuracy
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoseg.commands.demo import DATASET_NAME
from autoseg.commands.plan import plan_dataset
from autoseg.core.files import read_json
from autoseg.core.plan import load_plan
from autoseg.data import synthetic
from autoseg.data.evaluation import evaluate_folders
from autoseg.inference.int8 import MEAN_TOLERANCE, WORST_TOLERANCE  # issue 13's tolerance, as export --int8
from autoseg.inference.predictor import REPORT, Predictor
from autoseg.workflows.fold import train_and_validate

#: TTA settings: name -> (mirror axes, adaptive threshold)
TTA = {"8": ((0, 1, 2), None), "4": ((0, 1), None), "2": ((0,), None), "none": ((), None),
       "adaptive": ((0, 1, 2), 0.9)}
REFERENCE = ("fp32", "8", 0.5)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16, help="training cases (fold 0 trains on 4/5)")
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 48, 40])
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--gpu-memory", type=float, default=0.03,
                        help="plan's memory budget (GB): small, so the patch is smaller than a case")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--adaptive", type=float, nargs="+", default=[0.9],
                        help="adaptive TTA thresholds to measure (each one setting)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true", help="stop after training (reuse with --keep)")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    return parser.parse_args()


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Data, plan and a trained fold 0 (reused when ``root`` has them); the training record."""
    raw, work = root / DATASET_NAME, root / "work"
    if not (raw / "dataset.json").is_file():
        synthetic.write_msd_brain(raw, args.cases, shape=tuple(args.shape), spacing=(args.spacing,) * 3,
                                  seed=args.seed, n_test=args.held_out)
    record_path = root / "training.json"
    if not record_path.is_file():
        plan_dataset(dataset_dir=raw, workdir=work, configurations=["3d_fullres"], gpu_memory_gb=args.gpu_memory,
                     show_progress=False)
        started = time.perf_counter()
        train_and_validate(workdir=work, fold="0", epochs=args.epochs, iterations=args.iterations, val_every=0,
                           workers=1, seed=args.seed, device="cpu", resume=False, validate=False,
                           show_progress=False)
        record = {"epochs": args.epochs, "iterations": args.iterations, "seed": args.seed,
                  "gpu_memory_gb": args.gpu_memory, "train_s": round(time.perf_counter() - started, 1)}
        record_path.write_text(json.dumps(record))
    return raw, work, json.loads(record_path.read_text())


def settings(thresholds: list[float]) -> list[tuple[str, str, float]]:
    """(precision, TTA name, step) for every setting, the reference first."""
    tta = [name for name in TTA if name != "adaptive"] + [f"adaptive-{t:g}" for t in thresholds]
    every = list(itertools.product(("fp32", "bf16"), tta, (0.5, 0.75)))
    return [REFERENCE] + [s for s in every if s != REFERENCE]


def tta_options(name: str) -> dict:
    if name.startswith("adaptive-"):
        return {"mirror_axes": TTA["adaptive"][0], "adaptive_tta": float(name.split("-", 1)[1])}
    axes, _ = TTA[name]
    return {"tta": bool(axes), "mirror_axes": axes or None}


def predict_setting(work: Path, raw: Path, out: Path, precision: str, tta: str, step: float) -> dict:
    """Predict the held-out cases with one setting; the passes from report.json and the per-case Dice."""
    predictor = Predictor.from_workdir(work, folds=["0"], device="cpu", precision=precision, step=step,
                                       **tta_options(tta))
    predictor.predict_folder(raw / "imagesTs", out, overwrite=True, show_progress=False)
    cases = read_json(out / REPORT)["cases"]
    summary = evaluate_folders(predictions=out, truth=raw / "labelsTs", dataset_json=raw / "dataset.json",
                               show_progress=False)
    return {"passes": {k: sum(c["passes"][k] for c in cases.values()) for k in ("run", "skipped")},
            "tiles": {k: sum(c["passes"][k] for c in cases.values()) for k in ("tiles", "mirrored_tiles")},
            "dice": {case: {name: scores["dice"] for name, scores in per_class.items()}
                     for case, per_class in summary["cases"].items()}}


def truth_has(raw: Path, classes: dict) -> dict[str, dict[str, bool]]:
    """Per case and class: does the truth contain it?"""
    import nibabel as nib

    present = {}
    for path in sorted((raw / "labelsTs").glob("*.nii.gz")):
        label = np.asarray(nib.load(path).dataobj)
        present[path.name[:-len(".nii.gz")]] = {n: bool(np.isin(label, c["values"]).any()) for n, c in classes.items()}
    return present


def compare(result: dict, reference: dict, present: dict) -> dict:
    """Per class: mean Dice against the truth, and the difference to the reference (mean, worst)."""
    classes = next(iter(reference["dice"].values())).keys()
    out, within = {}, True
    for name in classes:
        cases = [c for c in reference["dice"] if present[c][name]]
        diff = [result["dice"][c][name] - reference["dice"][c][name] for c in cases]
        empty = [c for c in reference["dice"] if not present[c][name]]
        changed = sum(result["dice"][c][name] != reference["dice"][c][name] for c in empty)
        mean_abs, worst = float(np.mean(np.abs(diff))), float(np.max(np.abs(diff)))
        ok = mean_abs <= MEAN_TOLERANCE and worst <= WORST_TOLERANCE
        within &= ok
        out[name] = {"dice": round(float(np.mean([result["dice"][c][name] for c in cases])), 4),
                     "diff_mean": round(float(np.mean(diff)), 5), "diff_mean_abs": round(mean_abs, 5),
                     "diff_worst": round(worst, 5), "empty_truth_changed": changed, "within": ok}
    return {"classes": out, "within_tolerance": within}


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    try:
        raw, work, training = prepare(root, args)
        if args.train_only:
            return
        plan = load_plan(work / DATASET_NAME / "plans.json")
        config = plan.configuration("3d_fullres")
        results = {}
        for precision, tta, step in settings(args.adaptive):
            name = f"{precision} tta={tta} step={step}"
            print(f"predicting {name}", file=sys.stderr, flush=True)
            results[name] = predict_setting(work, raw, root / "predictions" / name.replace(" ", "_"),
                                            precision, tta, step)
        reference = results[f"{REFERENCE[0]} tta={REFERENCE[1]} step={REFERENCE[2]}"]
        summary = evaluate_folders(predictions=root / "predictions" / "fp32_tta=8_step=0.5",
                                   truth=raw / "labelsTs", dataset_json=raw / "dataset.json", show_progress=False)
        present = truth_has(raw, summary["classes"])
        print(json.dumps({
            "data": {"training_cases": args.cases, "held_out": args.held_out, "shape": args.shape,
                     "spacing_mm": args.spacing, "patch": config.patch_size,
                     "stages": len(config.network.features_per_stage)},
            "training": training,
            "reference": {"setting": "fp32 tta=8 step=0.5",
                          "dice_full_volume": {n: round(summary["mean"][n]["dice"], 4) for n in summary["mean"]}},
            "tolerance": {"mean_abs": MEAN_TOLERANCE, "worst": WORST_TOLERANCE},
            "settings": {name: {"passes": r["passes"], "tiles": r["tiles"], **compare(r, reference, present)}
                         for name, r in results.items()},
        }, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
