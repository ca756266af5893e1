"""Tiny models trained by nnU-Net v2 itself, and its own predictions, for the import agreement tests.

nnU-Net is not a dependency of autoseg (not even of its test extra: nnunetv2 pins timm/torchvision,
which would pull a second torch into the test environment, see ``benchmarks/nnunet_env.sh``). The
slow tests run it from the separate virtual environment that script creates (``.bench/nnunet-venv``)
and skip, saying so, where it is absent. nnU-Net's path variables are set only in the environment of
the nnU-Net processes started here.

Each kind is one dataset of synthetic phantoms (``autoseg.phantoms.synthetic``) with held-out cases
in ``imagesTs/``, planned and preprocessed by nnU-Net, trained for a budget of a few iterations on
the CPU (``nnUNetTrainer_autosegBench``, ``benchmarks/nnunet_budget_trainer.py``) and predicted by
``nnUNetv2_predict`` (fold 0, mirror TTA, fp32 on the CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NNUNET_VENV = REPO / ".bench" / "nnunet-venv"
TRAINER = "nnUNetTrainer_autosegBench"
#: kind -> (dataset id, planner, plans identifier)
KINDS = {
    "plain": (901, "ExperimentPlanner", "nnUNetPlans"),
    "resenc": (902, "nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "regions": (903, "ExperimentPlanner", "nnUNetPlans"),
    "ct": (904, "ExperimentPlanner", "nnUNetPlans"),
}
N_TRAIN, N_TEST = 6, 2


def nnunet_missing() -> str | None:
    """Why nnU-Net cannot run here (None: it can)."""
    tool = NNUNET_VENV / "bin" / "nnUNetv2_train"
    if not tool.is_file():
        return f"nnU-Net v2 is not installed in {NNUNET_VENV}; create it with benchmarks/nnunet_env.sh"
    trainer = next((NNUNET_VENV / "lib").glob("python3*/site-packages/nnunetv2/training/nnUNetTrainer/autoseg_*"), None)
    if trainer is None:
        return "nnU-Net's venv lacks the budget trainer; rerun benchmarks/nnunet_env.sh"
    return None


@dataclass(frozen=True)
class NnunetModel:
    kind: str
    results: Path  # DatasetXXX_Name/Trainer__Plans__3d_fullres
    test_images: Path  # imagesTs
    test_labels: Path  # labelsTs
    predictions: Path  # nnUNetv2_predict's masks of imagesTs


def _raw_dataset(kind: str, folder: Path) -> None:
    """The phantoms of ``kind`` in nnU-Net's raw layout, with held-out cases in imagesTs/labelsTs."""
    from autoseg.phantoms.synthetic import write_nnunet_brain, write_nnunet_ct

    if kind == "ct":
        write_nnunet_ct(folder, N_TRAIN + N_TEST, shape=(12, 40, 36))
        for case in sorted(p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").glob("*.nii.gz"))[N_TRAIN:]:
            for sub, name in (("images", f"{case}_0000.nii.gz"), ("labels", f"{case}.nii.gz")):
                (folder / f"{sub}Ts").mkdir(exist_ok=True)
                shutil.move(folder / f"{sub}Tr" / name, folder / f"{sub}Ts" / name)
        record = json.loads((folder / "dataset.json").read_text())
        (folder / "dataset.json").write_text(json.dumps({**record, "numTraining": N_TRAIN}))
        return
    write_nnunet_brain(folder, N_TRAIN, shape=(32, 40, 36), channels=("FLAIR", "T1w"), n_test=N_TEST)
    if kind == "regions":
        record = json.loads((folder / "dataset.json").read_text())
        record["labels"] = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": [3]}
        record["regions_class_order"] = [1, 2, 3]
        (folder / "dataset.json").write_text(json.dumps(record))


def _run(command: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(["nice", "-n", "19", *command], env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed (exit {done.returncode}); see {log}")


def train_and_predict(kind: str, base: Path, iterations: int = 10, epochs: int = 2) -> NnunetModel:
    """Plan, preprocess, train fold 0 and predict the held-out cases with nnU-Net, under ``base``."""
    dataset_id, planner, plans = KINDS[kind]
    name = f"Dataset{dataset_id}_{kind.capitalize()}"
    env = {
        **os.environ,
        "nnUNet_raw": str(base / "raw"),
        "nnUNet_preprocessed": str(base / "preprocessed"),
        "nnUNet_results": str(base / "results"),
        "nnUNet_n_proc_DA": "1",
        "nnUNet_compile": "false",
        "OMP_NUM_THREADS": "2",
        "AUTOSEG_BENCH_EPOCHS": str(epochs),
        "AUTOSEG_BENCH_ITERATIONS": str(iterations),
        "AUTOSEG_BENCH_VAL_ITERATIONS": "1",
    }
    raw = base / "raw" / name
    _raw_dataset(kind, raw)
    bin_ = NNUNET_VENV / "bin"
    log = base / f"{kind}.log"
    _run(
        [str(bin_ / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1"]
        + ["-npfp", "1", "-pl", planner],
        env,
        log,
    )
    _run(
        [str(bin_ / "nnUNetv2_train"), str(dataset_id), "3d_fullres", "0", "-tr", TRAINER, "-p", plans]
        + ["-device", "cpu"],
        env,
        log,
    )
    predictions = base / f"{kind}_nnunet_predictions"
    _run(
        [str(bin_ / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions), "-d", str(dataset_id)]
        + ["-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", plans, "-device", "cpu", "-npp", "1", "-nps", "1"],
        env,
        log,
    )
    results = base / "results" / name / f"{TRAINER}__{plans}__3d_fullres"
    return NnunetModel(kind, results, raw / "imagesTs", raw / "labelsTs", predictions)


def export_zip(model: NnunetModel, output: Path, base: Path) -> Path:
    """``nnUNetv2_export_model_to_zip`` of the model's fold 0."""
    dataset_id, _, plans = KINDS[model.kind]
    summary = model.results / "fold_0" / "validation" / "summary.json"
    if not summary.is_file():  # the budget trainer skips the final validation, whose summary the exporter packs
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("{}")
    env = {**os.environ, "nnUNet_raw": str(base / "raw"), "nnUNet_preprocessed": str(base / "preprocessed")}
    env["nnUNet_results"] = str(base / "results")
    _run(
        [str(NNUNET_VENV / "bin" / "nnUNetv2_export_model_to_zip"), "-d", str(dataset_id), "-o", str(output)]
        + ["-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", plans, "--not_strict"],
        env,
        base / f"{model.kind}.log",
    )
    return output
