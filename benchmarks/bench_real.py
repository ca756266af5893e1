"""Real scans, side by side: autoseg and nnU-Net v2 on an MSD dataset (MSD Hippocampus by default).

Both tools get the same raw dataset, the same cross-validation folds (autoseg's ``splits.json``
written as nnU-Net's ``splits_final.json``), the same training budget (nnU-Net through its
default trainer with the budget set, ``benchmarks/nnunet_budget_trainer.py``) and the same
number of augmentation workers, and run one job at a time:

1. ``autoseg plan`` and ``nnUNetv2_plan_and_preprocess`` (timed);
2. per fold: ``autoseg train`` (with real validation every ``--val-every`` epochs: the
   Dice-versus-iterations curve) and ``nnUNetv2_train`` (timed, seconds per epoch from each
   tool's log);
3. per fold: each tool predicts the fold's validation cases with mirror TTA (timed), and
   autoseg's ``evaluate`` code scores both tools' masks the same way: Dice and HD95 per class
   and per case.

Prints ONE JSON object (also kept, as it grows, in the work folder's ``result.json``); progress and
the tools' own output go to stderr. Every phase carries
``cpu`` (its wall time, own CPU seconds and other programs' CPU seconds: well above 0 means
the machine was shared and the timing is not clean; the Dice figures are unaffected).

    bash benchmarks/nnunet_env.sh                          # once
    python benchmarks/bench_real.py ../shared/data/Task04_Hippocampus --keep /tmp/bench_real
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train import CpuMeter, code_state

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NNUNET_PYTHON = REPO / ".bench" / "nnunet-venv" / "bin" / "python"
NNUNET_TRAINER = "nnUNetTrainer_autosegBench"
NNUNET_ID = 904


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="an MSD dataset folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("--epochs", type=int, default=10, help="the budget: epochs (learning-rate schedule)")
    parser.add_argument("--iterations", type=int, default=25, help="the budget: training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=5, help="pseudo-Dice batches per epoch (both tools)")
    parser.add_argument("--val-every", type=int, default=2, help="autoseg's real validation interval (the curve)")
    parser.add_argument("--folds", nargs="+", default=["0"])
    parser.add_argument("--workers", type=int, default=1, help="augmentation processes (both tools)")
    parser.add_argument("--seed", type=int, default=0, help="autoseg's --seed (nnU-Net draws its own)")
    parser.add_argument("--tools", nargs="+", choices=["autoseg", "nnunet"], default=["autoseg", "nnunet"])
    parser.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep every file")
    return parser.parse_args()


def note(message: str) -> None:
    print(f"[bench_real] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one command (its output to stderr); its CPU report."""
    note("$ " + " ".join(cmd))
    with CpuMeter() as cpu:
        subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr, env=env)
    return cpu.report


# --------------------------------------------------------------------------- the data, once for both tools


def msd_cases(data: Path) -> list[str]:
    manifest = json.loads((data / "dataset.json").read_text())
    return sorted(Path(entry["label"]).name.removesuffix(".nii.gz") for entry in manifest["training"])


def nnunet_raw(data: Path, raw_root: Path) -> Path:
    """The MSD dataset in nnU-Net v2's raw layout, as links (nnU-Net's own converter needs an imagesTs/)."""
    manifest = json.loads((data / "dataset.json").read_text())
    modalities = manifest["modality"]
    if len(modalities) != 1:
        raise SystemExit("bench_real links single-channel MSD datasets only (4D multi-channel files need splitting)")
    folder = raw_root / f"Dataset{NNUNET_ID}_{manifest.get('name', 'Real')}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in msd_cases(data):
        (folder / "imagesTr" / f"{case}_0000.nii.gz").symlink_to((data / "imagesTr" / f"{case}.nii.gz").resolve())
        (folder / "labelsTr" / f"{case}.nii.gz").symlink_to((data / "labelsTr" / f"{case}.nii.gz").resolve())
    labels = {name: int(value) for value, name in manifest["labels"].items()}
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": modalities["0"]},
                "labels": labels,
                "numTraining": len(msd_cases(data)),
                "file_ending": ".nii.gz",
                "name": manifest.get("name", "Real"),
            },
            indent=1,
        )
    )
    return folder


def validation_inputs(data: Path, cases: list[str], work: Path) -> dict[str, Path]:
    """The fold's validation images in each tool's input layout, and their truth."""
    folders = {name: work / name for name in ("autoseg_in", "nnunet_in", "truth")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for case in cases:
        image = (data / "imagesTr" / f"{case}.nii.gz").resolve()
        (folders["autoseg_in"] / f"{case}.nii.gz").symlink_to(image)
        (folders["nnunet_in"] / f"{case}_0000.nii.gz").symlink_to(image)
        (folders["truth"] / f"{case}.nii.gz").symlink_to((data / "labelsTr" / f"{case}.nii.gz").resolve())
    return folders


# --------------------------------------------------------------------------- autoseg


def autoseg_plan(data: Path, work: Path) -> dict:
    cpu = run(["autoseg", "plan", "-d", str(data), "-w", str(work), "-c", "3d_fullres"])
    return {"plan_s": cpu["wall_s"], "cpu": cpu}


def autoseg_fold(work: Path, fold: str, args: argparse.Namespace, inputs: dict[str, Path], out: Path) -> dict:
    train = run(
        [
            "autoseg",
            "train",
            "-w",
            str(work),
            "--fold",
            fold,
            "--epochs",
            str(args.epochs),
            "--iterations",
            str(args.iterations),
            "--val-iterations",
            str(args.val_iterations),
            "--val-every",
            str(args.val_every),
            "--workers",
            str(args.workers),
            "--seed",
            str(args.seed),
            "--no-resume",
            "--no-validate",  # no final pass: the fold's validation cases are predicted below, timed
            "--no-progress",
        ]
    )
    log = [
        json.loads(line)
        for line in next(work.glob(f"*/models/3d_fullres/fold_{fold}/log.jsonl")).read_text().splitlines()
        if line.strip()
    ]
    epochs = [e for e in log if "epoch" in e and "event" not in e]
    curve = [
        {"iterations": (e["epoch"] + 1) * args.iterations, "real_dice": e["real_dice"]}
        for e in epochs
        if "real_dice" in e
    ]
    predict = run(
        [
            "autoseg",
            "predict",
            "-i",
            str(inputs["autoseg_in"]),
            "-o",
            str(out),
            "-w",
            str(work),
            "-f",
            fold,
            "--no-progress",
        ]
    )
    return {
        "train": train,
        "seconds_per_epoch": [round(e["epoch_time_s"], 1) for e in epochs],
        "train_loss": [round(e["train_loss"], 3) for e in epochs],
        "pseudo_dice": [e["pseudo_dice"] for e in epochs],
        "dice_vs_iterations": curve,
        "predict": predict,
    }


# --------------------------------------------------------------------------- nnU-Net


def nnunet_env(root: Path) -> dict[str, str]:
    """nnU-Net's three path variables, for its own processes only."""
    paths = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **{k: str(v) for k, v in paths.items()}}


def nnunet_plan(python: Path, env: dict[str, str], splits: Path) -> dict:
    bin_dir = python.parent
    cpu = run(
        [
            str(bin_dir / "nnUNetv2_plan_and_preprocess"),
            "-d",
            str(NNUNET_ID),
            "-c",
            "3d_fullres",
            "-np",
            "2",
            "-npfp",
            "2",
        ],
        env,
    )
    preprocessed = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{NNUNET_ID}_*"))
    folds = json.loads(splits.read_text())["folds"]
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": f["train"], "val": f["val"]} for f in folds]))
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    return {"plan_s": cpu["wall_s"], "cpu": cpu, "patch_size": plans["patch_size"], "batch_size": plans["batch_size"]}


def nnunet_fold(
    python: Path, env: dict[str, str], fold: str, args: argparse.Namespace, inputs: dict[str, Path], out: Path
) -> dict:
    bin_dir = python.parent
    env = {
        **env,
        "nnUNet_n_proc_DA": str(args.workers),
        "nnUNet_compile": "f",
        "AUTOSEG_BENCH_EPOCHS": str(args.epochs),
        "AUTOSEG_BENCH_ITERATIONS": str(args.iterations),
        "AUTOSEG_BENCH_VAL_ITERATIONS": str(args.val_iterations),
    }
    train = run(
        [str(bin_dir / "nnUNetv2_train"), str(NNUNET_ID), "3d_fullres", fold, "-device", "cpu", "-tr", NNUNET_TRAINER],
        env,
    )
    log = sorted(Path(env["nnUNet_results"]).rglob(f"fold_{fold}/training_log_*.txt"))[-1].read_text()
    predict = run(
        [
            str(bin_dir / "nnUNetv2_predict"),
            "-i",
            str(inputs["nnunet_in"]),
            "-o",
            str(out),
            "-d",
            str(NNUNET_ID),
            "-c",
            "3d_fullres",
            "-f",
            fold,
            "-tr",
            NNUNET_TRAINER,
            "-chk",
            "checkpoint_final.pth",
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
        ],
        env,
    )
    return {
        "train": train,
        "seconds_per_epoch": [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)],
        "train_loss": [round(float(t) + 1, 3) for t in re.findall(r"train_loss (-?[0-9.]+)", log)],
        "pseudo_dice": [pseudo_dice_values(line) for line in re.findall(r"Pseudo dice \[(.*?)\]", log)],
        "predict": predict,
    }


def pseudo_dice_values(logged: str) -> list[float]:
    """nnU-Net's logged pseudo-Dice list, plain (``0.83, 0.82``) or as numpy reprs (``np.float32(0.83), ...``)."""
    return [round(float(v), 4) for v in re.findall(r"(?<![a-z])(-?\d+\.?\d*(?:e-?\d+)?)(?![\d(])", logged)]


# --------------------------------------------------------------------------- scoring


def score(predictions: Path, truth: Path, dataset_json: Path) -> dict:
    """Dice and HD95 per class (mean over cases) and per case, by autoseg's evaluate."""
    from autoseg.data.evaluation.evaluate import evaluate_folders

    summary = evaluate_folders(
        predictions=predictions,
        truth=truth,
        dataset_json=dataset_json,
        output=predictions.parent / f"{predictions.name}_scores",
        show_progress=False,
    )
    per_class = {name: {m: summary["mean"][name].get(m) for m in ("dice", "hd95_mm")} for name in summary["mean"]}
    per_case = {
        case: {name: {m: s.get(m) for m in ("dice", "hd95_mm")} for name, s in scores.items()}
        for case, scores in summary["cases"].items()
    }
    return {"per_class": per_class, "per_case": per_case}


def main() -> None:
    args = arguments()
    data = args.data.resolve()
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-real-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict = {
        "data": str(data),
        "code": code_state(),
        "budget": {
            "epochs": args.epochs,
            "iterations": args.iterations,
            "val_iterations": args.val_iterations,
            "workers": args.workers,
        },
        "folds": {},
    }
    autoseg_work = work / "autoseg"
    if "autoseg" in args.tools:
        result["autoseg_plan"] = autoseg_plan(data, autoseg_work)
    else:
        run(["autoseg", "plan", "-d", str(data), "-w", str(autoseg_work), "-c", "3d_fullres"])
    splits = next(autoseg_work.glob("*/splits.json"))
    if "nnunet" in args.tools:
        env = nnunet_env(work / "nnunet")
        nnunet_raw(data, Path(env["nnUNet_raw"]))
        result["nnunet_plan"] = nnunet_plan(args.nnunet_python, env, splits)
    for fold in args.folds:
        val = json.loads(splits.read_text())["folds"][int(fold)]["val"]
        inputs = validation_inputs(data, val, work / f"fold_{fold}")
        entry: dict = {"validation_cases": len(val)}
        for tool in args.tools:
            out = work / f"fold_{fold}" / f"{tool}_masks"
            if tool == "autoseg":
                entry[tool] = autoseg_fold(autoseg_work, fold, args, inputs, out)
            else:
                entry[tool] = nnunet_fold(args.nnunet_python, env, fold, args, inputs, out)
            entry[tool]["scores"] = score(out, inputs["truth"], data / "dataset.json")
            note(f"fold {fold} {tool}: {json.dumps(entry[tool]['scores']['per_class'])}")
            result["folds"][fold] = entry
            (work / "result.json").write_text(json.dumps(result))  # a long run's figures so far
    print(json.dumps(result))


if __name__ == "__main__":
    main()
