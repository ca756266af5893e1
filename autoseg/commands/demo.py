"""``autoseg demo``: the whole workflow on the built-in brain-tumour phantom, in minutes.

It writes a phantom dataset in the MSD Task01 layout (training cases plus held-out
cases with their truth), then calls the same library functions as ``plan``, ``train``,
``predict`` and ``evaluate``, saying before each step what it does and which plain
command does the same. The default budget finishes in about ten minutes on two idle CPU
cores; on CUDA the phantoms, the case count and the budget are larger.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.core.errors import AutosegError
from autoseg.core.files import write_json
from autoseg.phantoms import synthetic

log = logging.getLogger(__name__)
DEMO_VERSION = 1
DATASET_NAME = "Task01_BrainTumour"
#: Held-out cases drawn in the overview.
OVERVIEW_CASES = 3


@dataclass(frozen=True)
class DemoBudget:
    """How much data and training the demo uses."""

    cases: int  # training cases (fold 0 trains on 4/5 of them)
    held_out: int  # cases predicted and scored at the end
    shape: tuple[int, int, int]
    spacing_mm: float  # isotropic; phantoms span a real head's 15-20 cm
    epochs: int
    iterations: int
    val_iterations: int


#: About ten minutes on two idle CPU cores (measured: docs/cli.md, "autoseg demo").
CPU_BUDGET = DemoBudget(
    cases=12, held_out=4, shape=(40, 48, 40), spacing_mm=4.0, epochs=40, iterations=20, val_iterations=2
)
#: One GPU: larger phantoms, more cases and ten times the iterations.
CUDA_BUDGET = DemoBudget(
    cases=40, held_out=8, shape=(96, 112, 96), spacing_mm=2.0, epochs=50, iterations=50, val_iterations=5
)


@dataclass
class DemoResult:
    folder: Path
    budget: DemoBudget
    device: str
    dice: dict[str, float]
    timings: dict[str, float]
    overview: Path
    #: the review page of the held-out predictions (predictions/report.html), when it was written.
    page: Path | None = None


def default_budget(device_type: str) -> DemoBudget:
    return CUDA_BUDGET if device_type == "cuda" else CPU_BUDGET


@dataclass(frozen=True)
class _Paths:
    output: Path

    @property
    def dataset(self) -> Path:
        return self.output / DATASET_NAME

    @property
    def work(self) -> Path:
        return self.output / "work"

    @property
    def predictions(self) -> Path:
        return self.output / "predictions"


def run_demo(
    *,
    output: Path,
    cases: int | None = None,
    held_out: int | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    shape: tuple[int, int, int] | None = None,
    device: str = "auto",
    workers: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> DemoResult:
    """Phantom data -> plan -> train fold 0 -> predict the held-out cases -> evaluate -> overview.png.

    Every argument left as None takes the device's default budget. ``say`` receives the
    step descriptions and their equivalent commands. Each run starts from scratch: the
    phantom dataset, predictions and fold 0 of a previous demo in ``output`` are replaced.
    """
    from autoseg.core.devices import resolve_device

    torch_device = resolve_device(device)
    budget = _budget(default_budget(torch_device.type), cases, held_out, epochs, iterations, shape)
    if budget.cases < 5:
        raise AutosegError(f"--cases {budget.cases} is too few: 5-fold cross-validation needs at least 5 cases")
    paths = _Paths(Path(output).expanduser().resolve())
    device_name = str(torch_device)
    steps = _Steps(say)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    fold = _data_plan_train(steps, paths, budget, seed, workers, device_name, show_progress)
    dice, overview, page = _predict_score_draw(steps, paths, budget, device_name, fold, show_progress)
    write_json(
        paths.output / "demo.json",
        {
            "version": DEMO_VERSION,
            "device": device_name,
            "budget": dataclasses.asdict(budget),
            "dice": dice,
            "timings": steps.timings,
        },
    )
    return DemoResult(paths.output, budget, device_name, dice, steps.timings, overview, page)


class _Steps:
    """Runs the demo's steps: says what each does and its plain command, and times it."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, what: str, command: str, action: Callable[[], Any]) -> Any:
        self.say(f"\n[{name}] {what}\n  $ {command}")
        started = time.perf_counter()
        value = action()
        self.timings[f"{name}_s"] = time.perf_counter() - started
        return value


def _data_plan_train(
    step: _Steps, paths: _Paths, budget: DemoBudget, seed: int, workers: int, device_name: str, show_progress: bool
) -> Path:
    """Write the phantoms, plan them and train fold 0; returns the fold's folder."""
    d, work = paths.dataset, paths.work
    step(
        "data",
        f"writing {budget.cases} training and {budget.held_out} held-out phantom cases "
        f"({'×'.join(map(str, budget.shape))} voxels of {budget.spacing_mm:g} mm, 4 channels) to {d}",
        f"python -c \"from autoseg.phantoms import synthetic; synthetic.write_msd_brain('{d}', {budget.cases}, "
        f'shape={budget.shape}, spacing={(budget.spacing_mm,) * 3}, seed={seed}, n_test={budget.held_out})"',
        lambda: _write_phantoms(paths, budget, seed),
    )
    config = step(
        "plan",
        "checking, fingerprinting and planning the dataset, then preprocessing it",
        f"autoseg plan -d {d} -w {work} -c 3d_fullres -j {workers}",
        lambda: _plan(paths, workers, show_progress),
    )
    step.say(
        f"  plan: spacing {_fmt(config.spacing)} mm, patch {_fmt(config.patch_size)}, batch "
        f"{config.batch_size}, {config.network.n_stages} stages"
    )
    return step(
        "train",
        f"training fold 0 for {budget.epochs} epochs × {budget.iterations} iterations on "
        f"{device_name} (a real run uses 1000 × 250)",
        f"autoseg train -w {work} --fold 0 --epochs {budget.epochs} --iterations {budget.iterations} "
        f"--val-iterations {budget.val_iterations} --device {device_name} --no-resume --no-validate",
        lambda: _train(paths, budget, device_name, seed, show_progress),
    )


def _predict_score_draw(
    step: _Steps, paths: _Paths, budget: DemoBudget, device_name: str, fold: Path, show_progress: bool
) -> tuple[dict[str, float], Path, Path | None]:
    """Predict the held-out cases (with their review page), score them and draw the overview; returns the Dice,
    the picture and the page."""
    d, work, predictions = paths.dataset, paths.work, paths.predictions
    page = step(
        "predict",
        f"segmenting the {budget.held_out} held-out cases with mirror TTA",
        f"autoseg predict -w {work} -i {d / 'imagesTs'} -o {predictions} -f 0 --device {device_name} --overwrite",
        lambda: _predict(paths, device_name, show_progress),
    )
    dice = step(
        "evaluate",
        "scoring the predictions against the held-out truth, per label and BraTS region",
        f"autoseg evaluate -p {predictions} -g {d / 'labelsTs'} --dataset-json {d / 'dataset.json'} --regions brats",
        lambda: _evaluate(paths, show_progress),
    )
    images = sorted((d / "imagesTs").glob("*.nii.gz"))[:OVERVIEW_CASES]
    overview = step(
        "overview",
        f"drawing {len(images)} held-out cases and the training curves; one case alone:",
        f"autoseg show {images[0]} --label {d / 'labelsTs' / images[0].name} "
        f"--pred {predictions / images[0].name} -o {paths.output / 'case.png'}",
        lambda: _overview(images, paths, fold / "log.jsonl", dice),
    )
    return dice, overview, page


def _write_phantoms(paths: _Paths, budget: DemoBudget, seed: int) -> None:
    for stale in (paths.dataset, paths.predictions):  # a smaller earlier demo must not leave cases behind
        shutil.rmtree(stale, ignore_errors=True)
    synthetic.write_msd_brain(
        paths.dataset,
        budget.cases,
        shape=budget.shape,
        spacing=(budget.spacing_mm,) * 3,
        seed=seed,
        n_test=budget.held_out,
    )


def _plan(paths: _Paths, workers: int, show_progress: bool):
    from autoseg.commands.plan import plan_dataset

    report = plan_dataset(
        dataset_dir=paths.dataset,
        workdir=paths.work,
        workers=workers,
        configurations=["3d_fullres"],
        show_progress=show_progress,
    )
    return report.plan.configurations["3d_fullres"]


def _train(paths: _Paths, budget: DemoBudget, device: str, seed: int, show_progress: bool) -> Path:
    from autoseg.training.trainer import train_fold

    return train_fold(
        workdir=paths.work,
        fold="0",
        epochs=budget.epochs,
        iterations=budget.iterations,
        val_iterations=budget.val_iterations,
        device=device,
        seed=seed,
        resume=False,
        show_progress=show_progress,
    ).folder


def _predict(paths: _Paths, device: str, show_progress: bool) -> Path | None:
    from autoseg.commands.predict import predict_folder, quality_reference, write_review_page
    from autoseg.core.workspace import find_dataset
    from autoseg.inference.predictor import Predictor

    predictor = Predictor.from_workdir(paths.work, folds=["0"], device=device)
    reference = quality_reference(find_dataset(paths.work), predictor.plan)  # the QC flags of report.json
    report = predict_folder(
        predictor,
        paths.dataset / "imagesTs",
        paths.predictions,
        overwrite=True,
        reference=reference,
        show_progress=show_progress,
    )
    if report.failed:
        case, reason = next(iter(report.failed.items()))
        raise AutosegError(f"the demo could not predict held-out case {case}: {reason}")
    return write_review_page(predictor, paths.dataset / "imagesTs", paths.predictions)


def _evaluate(paths: _Paths, show_progress: bool) -> dict[str, float]:
    from autoseg.data.evaluation.evaluate import evaluate_folders

    summary = evaluate_folders(
        predictions=paths.predictions,
        truth=paths.dataset / "labelsTs",
        regions="brats",
        dataset_json=paths.dataset / "dataset.json",
        show_progress=show_progress,
    )
    return {name: values["dice"] for name, values in summary["mean"].items()}


def _budget(default: DemoBudget, cases, held_out, epochs, iterations, shape) -> DemoBudget:
    """The device's default budget with the caller's values where given."""
    given = {
        "cases": cases,
        "held_out": held_out,
        "epochs": epochs,
        "iterations": iterations,
        "shape": tuple(shape) if shape is not None else None,
    }
    return dataclasses.replace(default, **{k: v for k, v in given.items() if v is not None})


def _overview(images: list[Path], paths: _Paths, log_path: Path, dice: dict[str, float]) -> Path:
    from autoseg.visual.cases import load_view
    from autoseg.visual.overview import render_overview

    views = [
        load_view(str(image), label=paths.dataset / "labelsTs" / image.name, prediction=paths.predictions / image.name)
        for image in images
    ]
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    title = "Dice over the held-out cases: " + ", ".join(f"{n} {v:.2f}" for n, v in dice.items())
    return render_overview(views, [e for e in lines if "epoch" in e], paths.output / "overview.png", title)


def _fmt(values) -> str:
    return "×".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)


def summary(result: DemoResult) -> list:
    """What ``demo`` prints at the end: the held-out Dice per class, the time and where the pictures are."""
    from autoseg.core.tables import table

    return [
        "\nDice on the held-out cases (1 is perfect):",
        table(None, ["class", "Dice"], [[name, f"{value:.3f}"] for name, value in result.dice.items()], right={1}),
        f"\n{sum(result.timings.values()) / 60:.1f} min on {result.device}; pictures in {result.overview}",
        "Next: look at a case with `autoseg show`, or run the same commands on your own data.",
    ] + ([f"Review page of the held-out predictions (open it in a browser): {result.page}"] if result.page else [])
