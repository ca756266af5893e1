"""An nnU-Net-trained model, imported: autoseg's predict time and masks against ``nnUNetv2_predict``, in one run.

    python benchmarks/bench_nnunet_import.py --model nnUNet_results/DatasetXXX/Trainer__Plans__3d_fullres \\
        --input imagesTs --work SCRATCH [--folds 0] [--device cpu]

1. ``nnUNetv2_predict_from_modelfolder`` (the nnU-Net venv of benchmarks/nnunet_env.sh; fp32, mirror TTA,
   step 0.5, the given folds) predicts ``--input``;
2. ``autoseg import`` installs the model into a scratch work folder;
3. ``autoseg predict`` with its defaults (the same TTA, step and folds) and with ``--fast`` (no TTA, step
   0.75: the fastest setting accepted) predicts the same cases.

Each is timed as a whole command (wall seconds, startup included), run one after the other, under the
same load. The masks of the default run are compared voxel by voxel with nnU-Net's (per case: the share of
equal voxels). Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
NNUNET_BIN = REPO / ".bench" / "nnunet-venv" / "bin"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{command[0]} failed:\n{done.stderr[-2000:]}")
    return round(time.perf_counter() - start, 2)


def agreement(ours: Path, theirs: Path) -> dict[str, float]:
    shares = {}
    for path in sorted(theirs.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / path.name)))
        shares[path.name] = round(float((a == b).mean()) * 100, 4) if a.shape == b.shape else 0.0
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="nnU-Net's Trainer__Plans__configuration folder")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--folds", nargs="+", default=["0"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    autoseg = [sys.executable, "-m", "autoseg.cli"]
    seconds = {
        "nnunet": timed(
            [str(NNUNET_BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(args.input), "-o", str(work / "nnunet")]
            + ["-m", str(args.model), "-f", *args.folds, "-device", args.device, "-npp", "1", "-nps", "1"]
        )
    }
    timed([*autoseg, "import", str(args.model), "-w", str(work / "autoseg"), "--overwrite"])
    common = ["-i", str(args.input), "-w", str(work / "autoseg"), "--device", args.device, "--folds", *args.folds]
    seconds["autoseg_default"] = timed([*autoseg, "predict", "-o", str(work / "default"), *common])
    seconds["autoseg_fast"] = timed([*autoseg, "predict", "-o", str(work / "fast"), "--fast", *common])
    cases = len(list((work / "nnunet").glob("*.nii.gz")))
    print(
        json.dumps(
            {
                "model": str(args.model),
                "cases": cases,
                "device": args.device,
                "seconds": seconds,
                "voxel_agreement_percent": agreement(work / "default", work / "nnunet"),
                "fast_agreement_percent": agreement(work / "fast", work / "nnunet"),
                "mean_fast_vs_default": float(np.mean(list(agreement(work / "fast", work / "default").values()))),
            }
        )
    )


if __name__ == "__main__":
    main()
