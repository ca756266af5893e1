"""``autoseg demo``: the whole workflow on the built-in brain-tumour phantom, in minutes.

It writes a phantom dataset in the MSD Task01 layout (training cases plus held-out
cases with their truth), then calls the same library functions as ``plan``, ``train``,
``predict`` and ``evaluate``, saying before each step what it does and which plain
command does the same. The default budget finishes in about five minutes on two CPU
cores; on CUDA the phantoms, the case count and the budget are larger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autoseg import synthetic
from autoseg.errors import AutosegError
from autoseg.jsonio import write_json

log = logging.getLogger(__name__)
DEMO_VERSION = 1
DATASET_NAME = "Task01_BrainTumour"
#: Held-out cases drawn in the overview.
OVERVIEW_CASES = 3


@dataclass(frozen=True)
class DemoBudget:
    """How much data and training the demo uses."""

    cases: int          # training cases (fold 0 trains on 4/5 of them)
    held_out: int       # cases predicted and scored at the end
    shape: tuple[int, int, int]
    spacing_mm: float   # isotropic; phantoms span a real head's 15-20 cm
    epochs: int
    iterations: int
    val_iterations: int


#: About five minutes on two CPU cores (measured: docs/demo.md).
CPU_BUDGET = DemoBudget(cases=12, held_out=4, shape=(40, 48, 40), spacing_mm=4.0,
                        epochs=10, iterations=20, val_iterations=2)
#: One GPU: larger phantoms, more cases and ten times the iterations.
CUDA_BUDGET = DemoBudget(cases=40, held_out=8, shape=(96, 112, 96), spacing_mm=2.0,
                         epochs=50, iterations=50, val_iterations=5)


@dataclass
class DemoResult:
    folder: Path
    budget: DemoBudget
    device: str
    dice: dict[str, float]
    timings: dict[str, float]
    overview: Path


def default_budget(device_type: str) -> DemoBudget:
    return CUDA_BUDGET if device_type == "cuda" else CPU_BUDGET


def run_demo(*, output: Path, cases: int | None = None, held_out: int | None = None, epochs: int | None = None,
             iterations: int | None = None, shape: tuple[int, int, int] | None = None, device: str = "auto",
             workers: int | None = None, seed: int = 0, show_progress: bool = True,
             say: Callable[[str], None] = log.info) -> DemoResult:
    """Phantom data -> plan -> train fold 0 -> predict the held-out cases -> evaluate -> overview.png.

    Every argument left as None takes the device's default budget. ``say`` receives the
    step descriptions and their equivalent commands. Each run starts from scratch: the
    phantom dataset, predictions and fold 0 of a previous demo in ``output`` are replaced.
    """
    from autoseg.devices import resolve_device
    from autoseg.evaluation import evaluate_folders
    from autoseg.inference.predictor import Predictor
    from autoseg.planning.api import plan_dataset
    from autoseg.training.trainer import train_fold

    torch_device = resolve_device(device)
    budget = _budget(default_budget(torch_device.type), cases, held_out, epochs, iterations, shape)
    if budget.cases < 5:
        raise AutosegError(f"--cases {budget.cases} is too few: 5-fold cross-validation needs at least 5 cases")
    output = Path(output).expanduser().resolve()
    dataset, work = output / DATASET_NAME, output / "work"
    predictions = output / "predictions"
    workers = workers if workers is not None else (os.cpu_count() or 1)
    timings: dict[str, float] = {}
    device_name = str(torch_device)

    def step(name: str, what: str, command: str) -> float:
        say(f"\n[{name}] {what}\n  $ {command}")
        return time.perf_counter()

    started = step("data", f"writing {budget.cases} training and {budget.held_out} held-out phantom cases "
                   f"({'×'.join(map(str, budget.shape))} voxels of {budget.spacing_mm:g} mm, 4 channels) to {dataset}",
                   f"python -c \"from autoseg import synthetic; synthetic.write_msd_brain('{dataset}', "
                   f"{budget.cases}, shape={budget.shape}, spacing={(budget.spacing_mm,) * 3}, seed={seed}, "
                   f"n_test={budget.held_out})\"")
    for stale in (dataset, predictions):
        shutil.rmtree(stale, ignore_errors=True)
    synthetic.write_msd_brain(dataset, budget.cases, shape=budget.shape, spacing=(budget.spacing_mm,) * 3, seed=seed,
                              n_test=budget.held_out)
    timings["data_s"] = time.perf_counter() - started

    started = step("plan", "checking, fingerprinting and planning the dataset, then preprocessing it",
                   f"autoseg plan -d {dataset} -w {work} -c 3d_fullres -j {workers}")
    report = plan_dataset(dataset_dir=dataset, workdir=work, workers=workers, configurations=["3d_fullres"],
                          show_progress=show_progress)
    config = report.plan.configurations["3d_fullres"]
    say(f"  plan: spacing {_fmt(config.spacing)} mm, patch {_fmt(config.patch_size)}, batch {config.batch_size}, "
        f"{config.network.n_stages} stages")
    timings["plan_s"] = time.perf_counter() - started

    started = step("train", f"training fold 0 for {budget.epochs} epochs × {budget.iterations} iterations on "
                   f"{device_name} (a real run uses 1000 × 250)",
                   f"autoseg train -w {work} --fold 0 --epochs {budget.epochs} --iterations {budget.iterations} "
                   f"--val-iterations {budget.val_iterations} --device {device_name} --no-resume --no-validate")
    trained = train_fold(workdir=work, fold="0", epochs=budget.epochs, iterations=budget.iterations,
                         val_iterations=budget.val_iterations, device=device_name, seed=seed, resume=False,
                         validate=False, show_progress=show_progress)
    timings["train_s"] = time.perf_counter() - started

    started = step("predict", f"segmenting the {budget.held_out} held-out cases with mirror TTA",
                   f"autoseg predict -w {work} -i {dataset / 'imagesTs'} -o {predictions} -f 0 --device {device_name}")
    predictor = Predictor.from_workdir(work, folds=["0"], device=device_name)
    predicted = predictor.predict_folder(dataset / "imagesTs", predictions, overwrite=True,
                                         show_progress=show_progress)
    if predicted.failed:
        raise AutosegError(f"prediction failed for {', '.join(predicted.failed)}: {next(iter(predicted.failed.values()))}")
    timings["predict_s"] = time.perf_counter() - started

    started = step("evaluate", "scoring the predictions against the held-out truth, per label and BraTS region",
                   f"autoseg evaluate -p {predictions} -g {dataset / 'labelsTs'} "
                   f"--dataset-json {dataset / 'dataset.json'} --regions brats")
    summary = evaluate_folders(predictions=predictions, truth=dataset / "labelsTs", regions="brats",
                               dataset_json=dataset / "dataset.json", show_progress=show_progress)
    dice = {name: values["dice"] for name, values in summary["mean"].items()}
    timings["evaluate_s"] = time.perf_counter() - started

    images = sorted((dataset / "imagesTs").glob("*.nii.gz"))[:OVERVIEW_CASES]
    first = images[0].name
    started = step("show", f"drawing {len(images)} held-out cases and the training curves; one case alone:",
                   f"autoseg show {images[0]} --label {dataset / 'labelsTs' / first} --pred {predictions / first} "
                   f"-o {output / 'case.png'}")
    overview = _overview(images, dataset / "labelsTs", predictions, trained.folder / "log.jsonl",
                         output / "overview.png")
    timings["overview_s"] = time.perf_counter() - started

    result = DemoResult(output, budget, device_name, dice, timings, overview)
    write_json(output / "demo.json", {"version": DEMO_VERSION, "device": device_name,
                                      "budget": dataclasses.asdict(budget), "dice": dice, "timings": timings})
    return result


def _budget(default: DemoBudget, cases, held_out, epochs, iterations, shape) -> DemoBudget:
    """The device's default budget with the caller's values where given."""
    given = {"cases": cases, "held_out": held_out, "epochs": epochs, "iterations": iterations,
             "shape": tuple(shape) if shape is not None else None}
    return dataclasses.replace(default, **{k: v for k, v in given.items() if v is not None})


def _overview(images: list[Path], truth: Path, predictions: Path, log_path: Path, path: Path) -> Path:
    from autoseg.visual.cases import load_view
    from autoseg.visual.overview import render_overview

    views = [load_view(str(image), label=truth / image.name, prediction=predictions / image.name) for image in images]
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return render_overview(views, [e for e in lines if "epoch" in e], path)


def _fmt(values) -> str:
    return "×".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)

