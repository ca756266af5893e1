"""Deployment on the real model: ``export --int8``'s verdict, and every predict setting against nnU-Net's.

Takes the work folder a ``bench_real.py --keep DIR`` run left (both tools trained on the same
fold) and, one job at a time on the fold's validation cases:

1. ``autoseg export --int8`` of autoseg's fold: accepted or refused, with its Dice differences
   against fp32 (``deployment.json``);
2. predicts them with ``nnUNetv2_predict`` (its defaults: fp32, mirror TTA) and with autoseg in
   each setting: the default, ``--backend openvino`` (fp32), ``--backend openvino --precision
   bf16`` and, where ``export --int8`` accepted the fold, ``-m model.zip --backend openvino
   --precision int8``; all with mirror TTA;
3. scores every setting's masks with the same code (``evaluate``): Dice per class, and the
   speed-up over nnU-Net's predictor measured in this run.

    python benchmarks/bench_real.py ../shared/data/Task04_Hippocampus --keep /tmp/bench_real
    python benchmarks/bench_real_deploy.py ../shared/data/Task04_Hippocampus /tmp/bench_real

Prints one JSON object (also written to ``DIR/deploy/result.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench_real import DEFAULT_NNUNET_PYTHON, NNUNET_ID, NNUNET_TRAINER, nnunet_env, run, score


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the MSD dataset bench_real ran on (for the labels' names)")
    parser.add_argument("work", type=Path, help="the --keep folder of a bench_real run with both tools")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    return parser.parse_args()


def nnunet_predict(args: argparse.Namespace, inputs: Path, out: Path) -> dict:
    bin_dir = args.nnunet_python.parent
    command = [str(bin_dir / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(NNUNET_ID)]
    command += ["-c", "3d_fullres", "-f", args.fold, "-tr", NNUNET_TRAINER, "-chk", "checkpoint_final.pth"]
    return run([*command, "-device", "cpu", "-npp", "1", "-nps", "1"], nnunet_env(args.work / "nnunet"))


def export_int8(args: argparse.Namespace, archive: Path) -> dict:
    """``export --int8`` of the fold, and the INT8 check's record from ``deployment.json``."""
    cpu = run(["autoseg", "export", "-w", str(args.work / "autoseg"), "-f", args.fold, "--int8", "-o", str(archive)])
    unpacked = archive.parent / "unpacked"
    shutil.unpack_archive(archive, unpacked)
    deployment = json.loads(next(unpacked.rglob("deployment.json")).read_text())
    records = [m["int8"] for entry in deployment["configurations"] for m in entry["models"] if "int8" in m]
    return {"cpu": cpu, "int8": records}


def settings(args: argparse.Namespace, archive: Path, int8_accepted: bool) -> dict[str, list[str]]:
    """autoseg's predict options per setting (the input, output and progress options come later)."""
    work = ["-w", str(args.work / "autoseg"), "-f", args.fold]
    found = {
        "autoseg default": work,
        "autoseg openvino fp32": [*work, "--backend", "openvino", "--precision", "fp32"],
        "autoseg openvino bf16": [*work, "--backend", "openvino", "--precision", "bf16"],
    }
    if int8_accepted:
        found["autoseg openvino int8"] = ["-m", str(archive), "--backend", "openvino", "--precision", "int8"]
    return found


def main() -> None:
    args = arguments()
    fold_dir = args.work / f"fold_{args.fold}"
    out_root = args.work / "deploy"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir()
    archive = out_root / "model.zip"
    result: dict = {"work": str(args.work), "fold": args.fold, "export": export_int8(args, archive)}
    accepted = any(r.get("accepted") for r in result["export"]["int8"])
    truth, dataset_json = fold_dir / "truth", args.data / "dataset.json"
    runs = {"nnU-Net default": None, **settings(args, archive, accepted)}
    for name, options in runs.items():
        out = out_root / name.replace(" ", "_")
        if options is None:
            cpu = nnunet_predict(args, fold_dir / "nnunet_in", out)
        else:
            cpu = run(
                ["autoseg", "predict", "-i", str(fold_dir / "autoseg_in"), "-o", str(out), *options, "--no-progress"]
            )
        result[name] = {"cpu": cpu, "dice": score(out, truth, dataset_json)["per_class"]}
        print(f"[bench_real_deploy] {name}: {json.dumps(result[name])}", file=sys.stderr, flush=True)
    reference = result["nnU-Net default"]["cpu"]["wall_s"]
    for name in runs:
        result[name]["speed_up_vs_nnunet"] = round(reference / result[name]["cpu"]["wall_s"], 2)
    (out_root / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
