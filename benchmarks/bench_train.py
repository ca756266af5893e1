"""Benchmark training speed: autoseg against nnU-Net v2, side by side, same data, same plan.

Writes a synthetic 4-channel brain dataset in the nnU-Net v2 layout, which both tools read,
and measures, one after another (never two at once):

1. autoseg's full pipeline: ``plan_dataset`` (3d_fullres), then ``train_fold`` of fold 0 for
   EPOCHS x ITERATIONS (+ VAL_ITERATIONS patch validations per epoch, no final full-volume
   validation) with WORKERS augmentation processes, in a child process. iterations/s come
   from the fold's log.jsonl (training iterations only), the first epoch left out as warm-up
   when there are two or more; also whole epochs (training + validation iterations, as in
   nnU-Net's "Epoch time"; logging, plot and checkpoints fall outside both), the wall time of
   ``train_fold`` and the exact peak RSS (getrusage) of the training process and of its
   largest augmentation worker (and, on CUDA, ``torch.cuda.max_memory_allocated``);
2. the network alone: ``train_step`` (forward, deep-supervision loss, backward, gradient
   clipping, SGD step) on random tensors of the plan's batch and patch, no data loading;
3. the data loader alone: batches/s of the training augmenter built exactly as training
   builds it (``build_loaders``, real preprocessed cases), per worker count, main process idle;
4. nnU-Net v2: ``nnUNetv2_plan_and_preprocess`` and ``nnUNetv2_train`` on the same dataset
   folder with its default trainer given the same budget (benchmarks/nnunet_budget_trainer.py),
   ``nnUNet_n_proc_DA=WORKERS``, ``nnUNet_compile=f``, run by benchmarks/nnunet_train_timing.py
   from its own virtual environment. Both plans are printed, and ``same_plan`` says whether
   they agree (patch, batch, spacing, stages, features, strides, kernels).

Every phase reports ``cpu``: its wall time, its own CPU seconds and other programs' CPU
seconds over the same interval (on 2 cores, ``other_cpu_s`` well above 0 means the phase was
slowed by someone else). ``code`` records the commit measured and whether autoseg/ had
uncommitted changes (the package is installed editable). Prints ONE JSON object to stdout;
progress lines and the tools' own output go to stderr.

    bash benchmarks/nnunet_env.sh            # once (and after editing nnunet_budget_trainer.py)
    python benchmarks/bench_train.py --cases 6 --shape 64 80 72 --epochs 3 --iterations 20 --workers 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NNUNET_PYTHON = REPO / ".bench" / "nnunet-venv" / "bin" / "python"
DATASET_NAME = "Dataset902_BenchTrain"

PLAN_CHILD = """
import json, sys, time
from pathlib import Path
from autoseg.commands.plan import plan_dataset
start = time.perf_counter()
plan_dataset(dataset_dir=Path(sys.argv[1]), workdir=Path(sys.argv[2]), workers=int(sys.argv[3]),
             configurations=["3d_fullres"], show_progress=False)
print(json.dumps({"plan_s": time.perf_counter() - start}))
"""

TRAIN_CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
from autoseg.training.trainer import train_fold
workdir, device = Path(sys.argv[1]), sys.argv[2]
epochs, iterations, val_iterations, workers = (int(a) for a in sys.argv[3:7])
start = time.perf_counter()
result = train_fold(workdir=workdir, fold="0", epochs=epochs, iterations=iterations, val_iterations=val_iterations,
                    workers=workers, device=device, resume=False, show_progress=False)
wall = time.perf_counter() - start
out = {"wall_s": wall, "folder": str(result.folder), "torch_threads": torch.get_num_threads(),
       "peak_main_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "peak_worker_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
if torch.cuda.is_available():
    out["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


def per_s(iterations: int, times: list[float]) -> float:
    counted = times[1:] if len(times) > 1 else times
    return round(iterations * len(counted) / sum(counted), 3)


class CpuMeter:
    """CPU seconds over a phase: the whole machine's (/proc/stat, all cores, steal included) and
    this process's with its reaped descendants; the difference is other programs' load, which
    on a 2-core machine slows the phase down. Linux only (elsewhere ``other_cpu_s`` is None)."""

    def __enter__(self) -> CpuMeter:
        self.start = (time.perf_counter(), self.machine_busy(), self.own())
        return self

    def __exit__(self, *exc) -> None:
        (wall0, busy0, own0), own1 = self.start, self.own()
        busy1 = self.machine_busy()
        self.report = {
            "wall_s": round(time.perf_counter() - wall0, 1),
            "own_cpu_s": round(own1 - own0, 1),
            "other_cpu_s": None
            if busy0 is None or busy1 is None
            else round(max(busy1 - busy0 - (own1 - own0), 0.0), 1),
        }

    @staticmethod
    def machine_busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
        except (OSError, ValueError):
            return None
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def code_state() -> dict:
    """The commit measured, and whether autoseg/ or benchmarks/ differ from it (editable install)."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "autoseg_modified": bool(git("status", "--porcelain", "--", "autoseg")),
        "benchmarks_modified": bool(git("status", "--porcelain", "--", "benchmarks")),
    }


def note(message: str) -> None:
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


def child_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def autoseg_plan_summary(config) -> dict:
    net = config.network
    return {
        "patch_size": config.patch_size,
        "batch_size": config.batch_size,
        "spacing": config.spacing,
        "n_stages": net.n_stages,
        "features_per_stage": net.features_per_stage,
        "strides": net.strides,
        "kernel_sizes": net.kernel_sizes,
        "convs_per_stage": [net.convs_per_stage_encoder, net.convs_per_stage_decoder],
    }


def autoseg_training(dataset: Path, work: Path, args) -> dict:
    from autoseg.core.plan import load_plan
    from autoseg.core.workspace import find_dataset
    from autoseg.training.trainer import fold_cases

    note("autoseg: plan and preprocess")
    planned = child_json([sys.executable, "-c", PLAN_CHILD, str(dataset), str(work), str(args.plan_processes)])
    note("autoseg: train_fold")
    with CpuMeter() as cpu:
        trained = child_json(
            [
                sys.executable,
                "-c",
                TRAIN_CHILD,
                str(work),
                args.device,
                str(args.epochs),
                str(args.iterations),
                str(args.val_iterations),
                str(args.workers),
            ]
        )
    workspace = find_dataset(work)
    config = load_plan(workspace.plans).configuration("3d_fullres")
    log = [
        json.loads(line) for line in (Path(trained["folder"]) / "log.jsonl").read_text().splitlines() if line.strip()
    ]
    epochs = [e for e in log if "epoch" in e]
    train_times = [args.iterations / e["iterations_per_s"] for e in epochs]
    epoch_times = [e["epoch_time_s"] for e in epochs]
    return {
        "train_cases": len(fold_cases(workspace, "0")[0]),
        "plan": autoseg_plan_summary(config),
        "plan_and_preprocess_s": round(planned["plan_s"], 2),
        "train_times_s": [round(t, 2) for t in train_times],
        "epoch_times_s": [round(t, 2) for t in epoch_times],
        "iterations_per_s": per_s(args.iterations, train_times),
        "epoch_iterations_per_s": per_s(args.iterations, epoch_times),
        "wall_s": round(trained["wall_s"], 2),
        "torch_threads": trained["torch_threads"],
        **{k: v for k, v in trained.items() if k.startswith("peak_")},
        "cpu": cpu.report,
    }


def network_alone(work: Path, device_name: str, steps: int) -> dict:
    """One training step without data loading: what the convolutions alone allow."""
    import torch

    from autoseg.core.devices import precision_for
    from autoseg.core.plan import load_plan
    from autoseg.core.workspace import find_dataset
    from autoseg.model.network import build_network
    from autoseg.training.settings import TrainingSettings
    from autoseg.training.trainer import build_loss, train_step

    note("autoseg: network alone")
    plan = load_plan(find_dataset(work).plans)
    config = plan.configuration("3d_fullres")
    device = torch.device(device_name)
    precision, autocast_dtype = precision_for(device)
    torch.manual_seed(0)
    network = build_network(config, len(plan.channel_names), plan.num_classes).to(device)
    loss_fn = build_loss(plan, config, network)
    settings = TrainingSettings(dataset=plan.dataset, configuration=config.name, fold="0", device=device.type)
    optimizer = torch.optim.SGD(
        network.parameters(),
        lr=settings.initial_lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    batch = {
        "data": torch.randn(config.batch_size, len(plan.channel_names), *config.patch_size),
        "target": torch.randint(0, plan.num_classes, (config.batch_size, 1, *config.patch_size), dtype=torch.int16),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    network.train()
    timings = []
    for _ in range(steps + 1):  # the first step is the warm-up
        start = time.perf_counter()
        train_step(network, loss_fn, optimizer, scaler, batch, device, config.dims, settings, autocast_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    out = {
        "steps": steps,
        "step_times_s": [round(t, 3) for t in timings[1:]],
        "iterations_per_s": round(steps / sum(timings[1:]), 3),
    }
    if device.type == "cuda":
        out["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def loader_alone(work: Path, worker_counts: list[int], seconds: float) -> list[dict]:
    """Training batches/s of the augmenter that ``train_fold`` builds (bench_loader.py's method)."""
    from autoseg.core.plan import load_plan
    from autoseg.core.workspace import find_dataset
    from autoseg.training.distributed import DistributedContext
    from autoseg.training.settings import TrainingSettings
    from autoseg.training.trainer import build_loaders, fold_cases

    workspace = find_dataset(work)
    plan = load_plan(workspace.plans)
    config = plan.configuration("3d_fullres")
    train_ids, val_ids = fold_cases(workspace, "0")
    runs = []
    for workers in worker_counts:
        note(f"autoseg: loader alone, {workers} worker(s)")
        settings = TrainingSettings(
            dataset=plan.dataset, configuration=config.name, fold="0", workers=workers, batch_size=config.batch_size
        )
        loaders = build_loaders(plan, config, workspace, train_ids, val_ids, settings, DistributedContext(), 0)
        try:
            for _ in range(max(workers, 1)):  # warm-up: every worker's first batch
                next(loaders[0])
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                next(loaders[0])
                count += 1
            elapsed = time.perf_counter() - start
        finally:
            for loader in loaders:
                if hasattr(loader, "_finish"):
                    loader._finish()
        runs.append(
            {
                "workers": workers,
                "batches": count,
                "seconds": round(elapsed, 2),
                "batches_per_s": round(count / elapsed, 3),
            }
        )
    return runs


def nnunet_training(python: Path, dataset: Path, work: Path, args) -> dict:
    cmd = [
        str(python),
        str(REPO / "benchmarks" / "nnunet_train_timing.py"),
        "--raw",
        str(dataset),
        "--work",
        str(work),
        "--workers",
        str(args.workers),
        "--plan-processes",
        str(args.plan_processes),
        "--epochs",
        str(args.epochs),
        "--iterations",
        str(args.iterations),
        "--val-iterations",
        str(args.val_iterations),
        "--device",
        args.device,
    ]
    note("nnU-Net: plan_and_preprocess and nnUNetv2_train")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_plan(ours: dict, theirs: dict) -> bool:
    keys = ("patch_size", "batch_size", "n_stages", "features_per_stage", "strides", "kernel_sizes")
    spacing = all(abs(a - b) < 1e-6 for a, b in zip(ours["spacing"], theirs["spacing"]))
    return spacing and all(
        list(ours[k]) == list(theirs[k]) if isinstance(ours[k], list) else ours[k] == theirs[k] for k in keys
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 80, 72], help="z y x of each case")
    parser.add_argument("--epochs", type=int, default=3, help="first epoch is warm-up when >= 2")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations per epoch")
    parser.add_argument("--val-iterations", type=int, default=2, help="patch-validation iterations per epoch")
    parser.add_argument("--workers", type=int, default=1, help="augmentation processes, both tools")
    parser.add_argument(
        "--loader-workers", type=int, nargs="+", default=[1, 2], help="worker counts for the loader-alone measurement"
    )
    parser.add_argument("--loader-seconds", type=float, default=12.0, help="measuring time per worker count")
    parser.add_argument("--network-steps", type=int, default=6, help="timed steps of the network alone (+1 warm-up)")
    parser.add_argument("--plan-processes", type=int, default=2, help="processes for planning, both tools")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    parser.add_argument("--skip-nnunet", action="store_true")
    args = parser.parse_args()
    if args.epochs < 1 or args.iterations < 1 or args.val_iterations < 1:
        parser.error("--epochs, --iterations and --val-iterations must be >= 1")

    from autoseg.phantoms import synthetic

    code = code_state()
    scratch = Path(tempfile.mkdtemp(prefix="bench_train_"))
    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    try:
        dataset = synthetic.write_nnunet_brain(scratch / DATASET_NAME, args.cases, shape=tuple(args.shape))
        work = scratch / "autoseg_work"
        ours = autoseg_training(dataset, work, args)
        with CpuMeter() as cpu:
            ours["network_alone"] = network_alone(work, args.device, args.network_steps)
        ours["network_alone"]["cpu"] = cpu.report
        with CpuMeter() as cpu:
            ours["loader_alone"] = {"runs": loader_alone(work, args.loader_workers, args.loader_seconds)}
        ours["loader_alone"]["cpu"] = cpu.report
        import torch

        report = {
            "benchmark": "train",
            "code": {**code, "autoseg_modified_at_end": code_state()["autoseg_modified"]},
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cases": args.cases,
            "shape": args.shape,
            "workers": args.workers,
            "budget": {"epochs": args.epochs, "iterations": args.iterations, "val_iterations": args.val_iterations},
            "autoseg": ours,
        }
        if not args.skip_nnunet:
            theirs = nnunet_training(args.nnunet_python, dataset, scratch / "nnunet_work", args)
            report["nnunet"] = theirs
            report["same_plan"] = same_plan(ours["plan"], theirs["plan"])
            report["speed_ratio_iterations"] = round(ours["iterations_per_s"] / theirs["iterations_per_s"], 2)
            report["speed_ratio_epochs"] = round(ours["epoch_iterations_per_s"] / theirs["epoch_iterations_per_s"], 2)
        report["load_avg_1min"] = {"start": load_start, "end": round(os.getloadavg()[0], 2)}
        report["total_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
