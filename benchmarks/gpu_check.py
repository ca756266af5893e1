"""GPU readiness in one command: is autoseg fast on this GPU, and where would it stall?

Prints ONE JSON object (progress goes to stderr) with, on one CUDA GPU, in about 8 minutes:

* ``train_network``: training iterations/s of the Task01 reference plan's 3d_fullres network
  (plans/Task01_BrainTumour/plans.json: patch 128^3, batch 2, 31 M parameters) on random
  batches, exactly as training runs it (``build_model``: channels-last on CUDA;
  ``train_step``: autocast at ``precision_for``'s choice, bf16 where supported), without and
  with ``torch.compile``;
* ``train_loader``: training iterations/s with real augmentation (``build_loaders`` on
  synthetic brain cases preprocessed by ``plan_dataset``, Task01's patch and network) for
  1, 4 and 8 augmentation workers; ``loader_bound`` says whether the loader holds the GPU back
  (below 90 % of the network alone);
* ``peak_gpu_memory_gb`` of each part;
* ``predict``: one BraTS-size case (4 x 155 x 240 x 240, 1 mm) predicted end to end
  (``Predictor.predict_case``: read, preprocess, sliding window, export) with 5 folds x 8
  mirrors, random weights; ``seconds_cold`` (first case) and ``seconds`` (second);
* ``ddp``: with more than one visible GPU, NCCL DDP over all of them (torchrun, one process per
  GPU, each with the plan's batch): iterations/s per rank and the speed-up over one GPU.

Without a GPU (or with ``--tiny``) everything runs at tiny sizes on the CPU (patch 16^3, four
stages, an eighth of the features, a 20x24x22 case, 1 and 2 workers, ``torch.compile`` with the
``eager`` backend), so CI proves the script runs; those figures say nothing about speed.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK01 = REPO / "plans" / "Task01_BrainTumour" / "plans.json"
CONFIGURATION = "3d_fullres"
BRATS_SHAPE = (155, 240, 240)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the real sizes on a GPU, tiny ones for the CPU smoke run."""

    patch: tuple[int, int, int] | None  # None: the plan's
    feature_scale: float
    case_shape: tuple[int, int, int]
    train_cases: int
    train_case_shape: tuple[int, int, int]
    steps: int
    workers: tuple[int, ...]
    compile_backend: str
    stages: int | None = None  # None: the plan's; fewer keep a small patch's bottom above 1 voxel
    folds: int = 5


REAL = Sizes(None, 1.0, BRATS_SHAPE, 4, (138, 169, 138), 20, (1, 4, 8), "inductor")
TINY = Sizes((16, 16, 16), 0.125, (20, 24, 22), 5, (24, 28, 26), 2, (1, 2), "eager", stages=4)


def note(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def task01_config(sizes: Sizes, base=None):
    """The Task01 3d_fullres network and patch (tiny: smaller), on ``base``'s data settings if given."""
    from autoseg.core.plan import Network, load_plan

    plan = load_plan(TASK01)
    config = plan.configuration(CONFIGURATION)
    network, n = config.network, sizes.stages or config.network.n_stages
    if (sizes.feature_scale, n) != (1.0, network.n_stages):
        network = Network(
            network.kernel_sizes[:n],
            network.strides[:n],
            [max(4, round(f * sizes.feature_scale)) for f in network.features_per_stage[:n]],
            network.convs_per_stage_encoder,
            network.convs_per_stage_decoder,
        )
    source = base if base is not None else config
    config = dataclasses.replace(
        source, patch_size=list(sizes.patch or config.patch_size), batch_size=config.batch_size, network=network
    )
    return plan, config


def peak_gb(torch, device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def training_parts(plan, config, device, compile_backend: str | None, context=None):
    """(model, loss, optimizer, scaler, autocast dtype, settings) built by the trainer's own helpers."""
    import torch

    from autoseg.core.devices import precision_for
    from autoseg.training.distributed import DistributedContext
    from autoseg.training.settings import TrainingSettings
    from autoseg.training.trainer import build_loss, build_model

    precision, autocast_dtype = precision_for(device)
    model, network = build_model(plan, config, device, context or DistributedContext(), compile_model=False)
    if compile_backend:
        model = torch.compile(model, backend=compile_backend)
    settings = TrainingSettings(
        dataset=plan.dataset, configuration=config.name, fold="0", device=device.type, precision=precision
    )
    optimizer = torch.optim.SGD(
        network.parameters(),
        lr=settings.initial_lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return model, build_loss(plan, config, network), optimizer, scaler, autocast_dtype, settings, precision


def random_batch(plan, config, batch: int) -> dict:
    import torch

    return {
        "data": torch.randn(batch, len(plan.channel_names), *config.patch_size),
        "target": torch.randint(0, plan.num_classes, (batch, 1, *config.patch_size), dtype=torch.int16),
    }


def timed_steps(parts, batches, steps: int, device, dims: int) -> dict:
    """Iterations/s over ``steps`` training steps after two warm-up steps (compilation, cuDNN autotuning)."""
    import torch

    from autoseg.training.trainer import train_step

    model, loss_fn, optimizer, scaler, autocast_dtype, settings, _ = parts
    model.train()
    for _ in range(2):
        train_step(model, loss_fn, optimizer, scaler, next(batches), device, dims, settings, autocast_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, loss_fn, optimizer, scaler, next(batches), device, dims, settings, autocast_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"steps": steps, "iterations_per_s": round(steps / (time.perf_counter() - start), 3)}


def train_network(sizes: Sizes, device) -> list[dict]:
    """The network alone, without and with torch.compile."""
    import itertools

    import torch

    plan, config = task01_config(sizes)
    runs = []
    for backend in (None, sizes.compile_backend):
        note(f"network alone, compile={backend}")
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        parts = training_parts(plan, config, device, backend)
        started = time.perf_counter()
        result = timed_steps(
            parts, itertools.repeat(random_batch(plan, config, config.batch_size)), sizes.steps, device, config.dims
        )
        runs.append(
            {
                "compile": backend or "off",
                "precision": parts[-1],
                "channels_last": device.type == "cuda",
                **result,
                "seconds_with_warmup": round(time.perf_counter() - started, 1),
                "peak_gpu_memory_gb": peak_gb(torch, device),
                "parameters": sum(p.numel() for p in parts[2].param_groups[0]["params"]),
            }
        )
        del parts
    return runs


def synthetic_workspace(sizes: Sizes, root: Path):
    from autoseg.commands.plan import plan_dataset
    from autoseg.core.workspace import find_dataset
    from autoseg.phantoms import synthetic

    note(f"writing and preprocessing {sizes.train_cases} synthetic brain cases of {sizes.train_case_shape}")
    dataset = synthetic.write_msd_brain(root / "raw", sizes.train_cases, shape=sizes.train_case_shape)
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=[CONFIGURATION], show_progress=False)
    return find_dataset(work, None)


def train_loader(sizes: Sizes, device, root: Path, alone: float) -> list[dict]:
    """Training fed by the real augmentation pipeline, per worker count."""
    import torch

    from autoseg.core.plan import load_plan
    from autoseg.training.distributed import DistributedContext
    from autoseg.training.trainer import build_loaders, fold_cases

    workspace = synthetic_workspace(sizes, root)
    data_plan = load_plan(workspace.plans)
    _, config = task01_config(sizes, data_plan.configuration(CONFIGURATION))
    train_ids, val_ids = fold_cases(workspace, "0")
    runs = []
    for workers in sizes.workers:
        note(f"training with {workers} augmentation worker(s)")
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        parts = training_parts(data_plan, config, device, None)
        settings = dataclasses.replace(parts[5], workers=workers)
        loaders = build_loaders(data_plan, config, workspace, train_ids, val_ids, settings, DistributedContext(), 0)
        try:
            result = timed_steps(parts, loaders[0], max(sizes.steps, 2 * workers), device, config.dims)
        finally:
            for loader in loaders:
                if hasattr(loader, "_finish"):
                    loader._finish()
        runs.append(
            {
                "workers": workers,
                **result,
                "loader_bound": result["iterations_per_s"] < 0.9 * alone,
                "peak_gpu_memory_gb": peak_gb(torch, device),
            }
        )
    return runs


def predict(sizes: Sizes, device, root: Path) -> dict:
    """One case, 5 folds x 8 mirrors, end to end, twice (cold, then warm)."""
    import torch

    from autoseg.data.io.datasets import CaseFiles
    from autoseg.inference.predictor import Predictor
    from autoseg.model.network import build_network
    from autoseg.phantoms import synthetic

    plan, config = task01_config(sizes)
    plan = dataclasses.replace(plan, configurations={CONFIGURATION: config})
    note(f"predicting one {sizes.case_shape} case with {sizes.folds} folds x 8 mirrors")
    synthetic.write_msd_brain(root / "case", 1, shape=sizes.case_shape)
    image = root / "case" / "imagesTr" / "BRATS_001.nii.gz"
    torch.manual_seed(0)
    weights = [
        build_network(config, len(plan.channel_names), plan.num_classes, deep_supervision=False).state_dict()
        for _ in range(sizes.folds)
    ]
    predictor = Predictor.from_weights(plan, CONFIGURATION, weights, device=str(device), tta=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for run in range(2):
        start = time.perf_counter()
        predictor.predict_case(CaseFiles(f"case{run}", (image,), None), root / "pred")
        seconds.append(round(time.perf_counter() - start, 2))
    return {
        "shape": list(sizes.case_shape),
        "folds": sizes.folds,
        "mirrors": 8,
        "seconds_cold": seconds[0],
        "seconds": seconds[1],
        "goal_s_h100": 10,
        "peak_gpu_memory_gb": peak_gb(torch, device),
    }


def ddp(sizes: Sizes, gpus: int, one_gpu: float, tiny: bool) -> dict:
    """torchrun over every visible GPU, each rank with the plan's batch (weak scaling)."""
    note(f"NCCL DDP on {gpus} GPUs")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(gpus),
        str(Path(__file__).resolve()),
        "--ddp-rank",
        *(["--tiny"] if tiny else []),
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if out.returncode != 0:
        return {"gpus": gpus, "error": out.stderr[-2000:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["speedup_vs_one_gpu"] = round(result["iterations_per_s"] * gpus / one_gpu, 2)
    return {"gpus": gpus, **result}


def ddp_rank(sizes: Sizes) -> None:
    """One torchrun rank: the network with DDP (NCCL), the plan's batch on every rank."""
    import itertools

    import torch

    from autoseg.training.distributed import init_distributed, shutdown

    context = init_distributed("cuda")
    device = torch.device("cuda", context.local_rank)
    plan, config = task01_config(sizes)
    parts = training_parts(plan, config, device, None, context)
    result = timed_steps(
        parts, itertools.repeat(random_batch(plan, config, config.batch_size)), sizes.steps, device, config.dims
    )
    if context.is_main:
        print(json.dumps({"backend": torch.distributed.get_backend(), **result}), flush=True)
    del parts
    shutdown(context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda if present)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without a GPU)")
    parser.add_argument("--ddp-rank", action="store_true", help=argparse.SUPPRESS)  # run by torchrun
    args = parser.parse_args()
    import torch

    from autoseg.core.devices import resolve_device

    if args.ddp_rank:
        ddp_rank(TINY if args.tiny else REAL)
        return
    device = resolve_device(args.device)
    tiny = args.tiny or device.type != "cuda"
    sizes = TINY if tiny else REAL
    started = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "tiny": tiny,
        "torch": torch.__version__,
        "note": "tiny CPU smoke run: the figures say nothing about GPU speed" if tiny else "measured",
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        root = Path(scratch)
        report["train_network"] = train_network(sizes, device)
        alone = report["train_network"][0]["iterations_per_s"]
        report["train_loader"] = train_loader(sizes, device, root, alone)
        report["predict"] = predict(sizes, device, root)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    report["ddp"] = ddp(sizes, gpus, alone, tiny) if gpus > 1 else {"gpus": gpus, "skipped": "one GPU or none"}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
