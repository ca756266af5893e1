"""Training parity with nnU-Net, step by step: the batches, one optimiser step, and learning curves.

How the MSD Hippocampus training gap was taken apart (docs/real-data.md). It works on the work
folder of a ``benchmarks/bench_real.py --keep DIR`` run (``DIR/autoseg``: autoseg's plan and
preprocessed cases; ``DIR/nnunet``: nnU-Net's, with autoseg's folds as ``splits_final.json``).
Each subcommand runs in the environment of the tool it drives: autoseg's, or nnU-Net's virtual
environment (``benchmarks/nnunet_env.sh``) for the ``nnunet`` ones. Every subcommand prints JSON.

    # 1. the batches each tool's loader and augmentation feed to training (fold 0)
    python benchmarks/training_parity.py dump-autoseg DIR as.npz --batches 80
    .bench/nnunet-venv/bin/python benchmarks/training_parity.py dump-nnunet DIR nn.npz --batches 80
    python benchmarks/training_parity.py stats as.npz nn.npz
    # 2. one step: nnU-Net's initial weights, outputs and gradients, then autoseg's network, loss and
    #    SGD on the same weights and batches
    .bench/nnunet-venv/bin/python benchmarks/training_parity.py step-nnunet DIR nn.npz ref.pt
    python benchmarks/training_parity.py step-autoseg DIR nn.npz ref.pt
    # 3. a tool's network, initialisation, loss and optimiser trained on either tool's batches
    python benchmarks/training_parity.py train-autoseg DIR nn.npz --val as_val.npz --seed 0
    .bench/nnunet-venv/bin/python benchmarks/training_parity.py train-nnunet DIR as.npz --val as_val.npz
    # 4. autoseg's network, loss and optimiser from nnU-Net's initial weights (step-nnunet's ref.pt): the draw
    #    taken out, 80 steps of the two tools' training compared
    python benchmarks/training_parity.py train-autoseg DIR nn.npz --val as_val.npz --weights ref.pt
    # 5. the heads' initial bias: train's (the class shares of fold 0's training cases) against nnU-Net's 0,
    #    the rest of the initial weights the same draw
    python benchmarks/training_parity.py train-autoseg DIR nn.npz --val as_val.npz --seed 1
    python benchmarks/training_parity.py train-autoseg DIR nn.npz --val as_val.npz --seed 1 --zero-heads

``dump-autoseg`` also writes ``<out>_val.npz``: plain validation batches, the fixed set on which
``train-*`` measures a pseudo-Dice every 20 iterations. The learning rate follows the poly
schedule of a 10-epoch budget of 20 iterations per epoch (the issue's first measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EPOCH_ITERATIONS, EPOCHS = 20, 10


# --------------------------------------------------------------------------- autoseg's side


def autoseg_parts(work: Path):
    from autoseg.core.plan import load_plan
    from autoseg.core.workspace import find_dataset

    workspace = find_dataset(work / "autoseg", None)
    plan = load_plan(workspace.plans)
    return workspace, plan, plan.configuration("3d_fullres")


def dump_autoseg(args: argparse.Namespace) -> dict:
    from autoseg.training.distributed import DistributedContext
    from autoseg.training.settings import TrainingSettings
    from autoseg.training.trainer import build_loaders, fold_cases

    workspace, plan, config = autoseg_parts(args.work)
    train_ids, val_ids = fold_cases(workspace, "0")
    settings = TrainingSettings(
        dataset=workspace.name,
        configuration=config.name,
        fold="0",
        seed=args.seed,
        workers=1,
        foreground_fraction=config.training.foreground_fraction,
    )
    loaders = build_loaders(plan, config, workspace, train_ids, val_ids, settings, DistributedContext(), 0)
    for loader, out, count in ((loaders[0], args.out, args.batches), (loaders[1], val_path(args.out), 20)):
        batches = [next(loader) for _ in range(count)]
        np.savez(
            out,
            data=np.stack([np.asarray(b["data"]) for b in batches]),
            target=np.stack([np.asarray(b["target"]).astype(np.int8) for b in batches]),
        )
    for loader in loaders:
        loader._finish()
    return {"written": [str(args.out), str(val_path(args.out))]}


def val_path(out: Path) -> Path:
    return out.with_name(out.stem + "_val.npz")


def step_autoseg(args: argparse.Namespace) -> dict:
    """autoseg's network, loss and SGD from nnU-Net's initial weights on the same batches: the differences."""
    from autoseg.model.network import build_network
    from autoseg.training.trainer import build_loss

    _, plan, config = autoseg_parts(args.work)
    ref = torch.load(args.reference, weights_only=True)
    network = build_network(config, len(plan.channel_names), plan.num_classes)
    network.load_state_dict({autoseg_key(k): v for k, v in ref["weights"].items() if autoseg_key(k)})
    loss_fn = build_loss(plan, config, network)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    batches = np.load(args.batches)
    network.train()
    report: dict = {}
    for step in range(3):
        outputs = network(torch.from_numpy(batches["data"][step]))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(outputs, torch.from_numpy(batches["target"][step]).long())
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in network.named_parameters()}
            report["loss_minus_one_diff"] = abs(float(loss) - 1 - float(ref["loss"]))
            report["output_max_abs_diff"] = float((outputs[0] - ref["output"]).abs().max())
            report["gradient_max_relative_diff"] = max(
                float((grads[autoseg_key(k)] - g).norm() / (g.norm() + 1e-12)) for k, g in ref["gradients"].items()
            )
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
    after = network.state_dict()
    report["weights_after_3_steps_max_abs_diff"] = {
        k: float((after[autoseg_key(k)] - v).abs().max()) for k, v in ref["after"].items() if autoseg_key(k)
    }
    worst = max(report["weights_after_3_steps_max_abs_diff"].items(), key=lambda kv: kv[1])
    report["weights_after_3_steps_worst"] = {"tensor": worst[0], "max_abs_diff": worst[1]}
    del report["weights_after_3_steps_max_abs_diff"]
    return report


def autoseg_key(key: str) -> str | None:
    """autoseg's name for one of nnU-Net's PlainConvUNet state-dict keys (None: an alias nnU-Net keeps twice)."""
    rules = [
        (r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", "encoder.{0}.{1}.{2}.{3}"),
        (r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(weight|bias)", "decoder.{0}.{1}.{2}.{3}"),
        (r"decoder\.transpconvs\.(\d+)\.(weight|bias)", "upsample.{0}.{1}"),
        (r"decoder\.seg_layers\.(\d+)\.(weight|bias)", "heads.{0}.{1}"),
    ]
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            groups = ["0" if g == "conv" else "1" if g == "norm" else g for g in match.groups()]
            return template.format(*groups)
    return None


# --------------------------------------------------------------------------- nnU-Net's side


def nnunet_trainer(work: Path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    roots = {name: str(work / "nnunet" / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    os.environ.update(roots)  # nnU-Net reads its paths from these, in this process only
    preprocessed = next(Path(roots["nnUNet_preprocessed"]).glob("Dataset*"))
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset = json.loads((preprocessed / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def dump_nnunet(args: argparse.Namespace) -> dict:
    os.environ["nnUNet_n_proc_DA"] = "1"
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = nnunet_trainer(args.work)
    loader, _ = trainer.get_dataloaders()
    batches = [next(loader) for _ in range(args.batches)]
    np.savez(
        args.out,
        data=np.stack([b["data"].numpy() for b in batches]),
        target=np.stack([b["target"][0].numpy().astype(np.int8) for b in batches]),
    )
    return {"written": [str(args.out)]}


def nnunet_loss(trainer):
    def loss(outputs, target):
        targets = [target] + [
            F.interpolate(target.float(), size=o.shape[2:], mode="nearest-exact") for o in outputs[1:]
        ]
        return trainer.loss(outputs, targets) + 1  # nnU-Net reports -Dice + CE: shifted to autoseg's 1 - Dice + CE

    return loss


def step_nnunet(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    trainer = nnunet_trainer(args.work)
    network, optimizer, loss_fn = trainer.network, trainer.optimizer, nnunet_loss(trainer)
    batches = np.load(args.batches)
    reference = {"weights": {k: v.clone() for k, v in network.state_dict().items()}}
    network.train()
    for step in range(3):
        outputs = network(torch.from_numpy(batches["data"][step]))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(outputs, torch.from_numpy(batches["target"][step]).long())
        loss.backward()
        if step == 0:
            reference["loss"] = (loss - 1).detach()
            reference["output"] = outputs[0].detach()
            # the zero-weighted lowest output is left out of nnU-Net's loss: its head gets no gradient
            reference["gradients"] = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
    reference["after"] = {k: v.clone() for k, v in network.state_dict().items()}
    torch.save(reference, args.reference)
    return {"written": str(args.reference), "loss": float(reference["loss"]) + 1}


# --------------------------------------------------------------------------- both


def train_curve(network, optimizer, loss_fn, batches: Path, val: Path, iterations: int) -> list[dict]:
    """Train on the dumped batches (the poly schedule of the issue's budget); pseudo-Dice every 20 iterations."""
    data, target = np.load(batches)["data"], np.load(batches)["target"]
    curve, losses, start = [], [], time.perf_counter()
    network.train()
    for it in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 * (1 - min(it // EPOCH_ITERATIONS, EPOCHS - 1) / EPOCHS) ** 0.9
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(torch.from_numpy(data[it % len(data)])), torch.from_numpy(target[it % len(data)]).long())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (it + 1) % EPOCH_ITERATIONS == 0:
            curve.append(
                {
                    "iterations": it + 1,
                    "mean_loss": round(float(np.mean(losses[-EPOCH_ITERATIONS:])), 4),
                    "pseudo_dice": pseudo_dice(network, val),
                    "seconds": round(time.perf_counter() - start),
                }
            )
            print(json.dumps(curve[-1]), flush=True)
    return curve


@torch.no_grad()
def pseudo_dice(network, val: Path) -> list[float]:
    data, target = np.load(val)["data"], np.load(val)["target"]
    network.eval()
    tp, fp, fn = np.zeros(2), np.zeros(2), np.zeros(2)
    for x, y in zip(data, target):
        out = network(torch.from_numpy(x))
        predicted = (out[0] if isinstance(out, (list, tuple)) else out).argmax(1).numpy()
        for c in (1, 2):
            tp[c - 1] += ((predicted == c) & (y[:, 0] == c)).sum()
            fp[c - 1] += ((predicted == c) & (y[:, 0] != c)).sum()
            fn[c - 1] += ((predicted != c) & (y[:, 0] == c)).sum()
    network.train()
    return [round(float(d), 3) for d in 2 * tp / np.maximum(2 * tp + fp + fn, 1)]


def initial_head_bias(args: argparse.Namespace, workspace, plan) -> list[float] | None:
    """The heads' initial bias: ``train``'s (the class shares of fold 0's training cases), the shares
    ``--head-shares`` gives, or none (``--zero-heads``: nnU-Net's bias 0, autoseg before the prior)."""
    from autoseg.training import output_prior
    from autoseg.training.trainer import fold_cases

    if args.zero_heads:
        return None
    if args.head_shares:
        return output_prior.head_bias(args.head_shares, bool(plan.regions))
    return output_prior.initial_head_bias(workspace, plan, fold_cases(workspace, "0")[0])


def train_autoseg(args: argparse.Namespace) -> dict:
    from autoseg.model.network import build_network
    from autoseg.training.trainer import build_loss

    workspace, plan, config = autoseg_parts(args.work)
    torch.manual_seed(args.seed)
    bias = initial_head_bias(args, workspace, plan)
    network = build_network(config, len(plan.channel_names), plan.num_classes, head_bias=bias)
    if args.weights is not None:  # nnU-Net's initial weights (step-nnunet's reference): the draw taken out
        initial = torch.load(args.weights, weights_only=True)["weights"]
        network.load_state_dict({autoseg_key(k): v for k, v in initial.items() if autoseg_key(k)})
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    curve = train_curve(network, optimizer, build_loss(plan, config, network), args.batches, args.val, args.iterations)
    initial_weights = str(args.weights) if args.weights is not None else f"autoseg seed {args.seed}"
    return {
        "tool": "autoseg",
        "initial_weights": initial_weights,
        "head_bias": [round(b, 4) for b in bias] if bias is not None and args.weights is None else None,
        "batches": str(args.batches),
        "curve": curve,
    }


def train_nnunet(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    trainer = nnunet_trainer(args.work)
    curve = train_curve(
        trainer.network, trainer.optimizer, nnunet_loss(trainer), args.batches, args.val, args.iterations
    )
    return {"tool": "nnunet", "seed": args.seed, "batches": str(args.batches), "curve": curve}


def stats(args: argparse.Namespace) -> dict:
    """What a batch holds, per file: intensities, class shares and where the foreground sits in the patch,
    for the random and the forced-foreground samples apart (the last third of each batch)."""
    out = {}
    for path in args.files:
        batches = np.load(path)
        data, target = batches["data"][:, :, 0], batches["target"][:, :, 0]
        size = data.shape[1]
        forced_from = round(size * (1 - 0.33))
        entry = {"samples": int(data.shape[0] * size), "zero_voxel_share": round(float((data == 0).mean()), 4)}
        for c in (0, 1, 2):
            mask = target == c
            entry[f"class_{c}"] = {
                "voxel_share": round(float(mask.mean()), 4),
                "mean_intensity": round(float(data[mask].mean()), 4),
            }
        for name, samples in (("random", range(forced_from)), ("forced", range(forced_from, size))):
            centroids = np.array([np.argwhere(target[b, j] > 0).mean(0) for b in range(len(data)) for j in samples])
            entry[f"{name}_foreground_centroid"] = {
                "mean": centroids.mean(0).round(2).tolist(),
                "std": centroids.std(0).round(2).tolist(),
            }
        out[str(path)] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("dump-autoseg", "dump-nnunet"):
        p = sub.add_parser(name)
        p.add_argument("work", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--batches", type=int, default=80)
        p.add_argument("--seed", type=int, default=0)
    for name in ("step-nnunet", "step-autoseg"):
        p = sub.add_parser(name)
        p.add_argument("work", type=Path)
        p.add_argument("batches", type=Path)
        p.add_argument("reference", type=Path)
        p.add_argument("--seed", type=int, default=0)
    for name in ("train-autoseg", "train-nnunet"):
        p = sub.add_parser(name)
        p.add_argument("work", type=Path)
        p.add_argument("batches", type=Path)
        p.add_argument("--val", type=Path, required=True)
        p.add_argument("--iterations", type=int, default=80)
        p.add_argument("--seed", type=int, default=0)
    sub.choices["train-autoseg"].add_argument(
        "--weights", type=Path, default=None, help="start from step-nnunet's reference (nnU-Net's initial weights)"
    )
    heads = sub.choices["train-autoseg"].add_mutually_exclusive_group()
    heads.add_argument("--zero-heads", action="store_true", help="the heads' bias starts at 0 (nnU-Net's)")
    heads.add_argument(
        "--head-shares", type=float, nargs="+", default=None, help="the class shares the heads' bias starts at"
    )
    p = sub.add_parser("stats")
    p.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    run = {
        "dump-autoseg": dump_autoseg,
        "dump-nnunet": dump_nnunet,
        "step-nnunet": step_nnunet,
        "step-autoseg": step_autoseg,
        "train-autoseg": train_autoseg,
        "train-nnunet": train_nnunet,
        "stats": stats,
    }[args.command]
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
