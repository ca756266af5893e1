"""Ask nnU-Net v2's default ExperimentPlanner what it would plan for one of OUR fingerprints.

Why: lets us compare autoseg's planner with nnU-Net's on exactly the same dataset
statistics (including datasets we only have a fingerprint for, e.g. MSD Task01),
without reading a single image.

Run with the nnU-Net venv's python (see benchmarks/nnunet_env.sh):

    .bench/nnunet-venv/bin/python benchmarks/nnunet_plans_from_fingerprint.py FINGERPRINT.json [--work DIR]

How: our fingerprint is converted to nnU-Net's ``dataset_fingerprint.json`` and a
minimal ``dataset.json`` in a scratch nnUNet_raw / nnUNet_preprocessed tree. The
dataset.json lists the cases under its "dataset" key (paths that need not exist)
and sets ``overwrite_image_reader_writer`` to SimpleITKIO, so the planner never
opens an image and no dummy NIfTI files are needed. Prints ONE JSON object on
stdout; nnU-Net's own chatter goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
FILE_ENDING = ".nii.gz"


def to_nnunet_fingerprint(ours: dict[str, Any]) -> dict[str, Any]:
    """Map our fingerprint onto the keys nnU-Net's planner reads from dataset_fingerprint.json."""
    cases = [ours["cases"][k] for k in sorted(ours["cases"])]
    return {
        "spacings": [[float(s) for s in c["spacing"]] for c in cases],
        "shapes_after_crop": [[int(s) for s in c["shape_after_crop"]] for c in cases],
        "foreground_intensity_properties_per_channel": {
            str(i): {
                k: float(stats[k])
                for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")
            }
            for i, stats in enumerate(ours["foreground_intensities"])
        },
        "median_relative_size_after_cropping": float(ours["median_relative_size_after_crop"]),
    }


def to_nnunet_dataset_json(ours: dict[str, Any]) -> dict[str, Any]:
    """Build the minimal dataset.json the planner needs, with no image files behind it.

    Channel names pass through unchanged: nnU-Net picks CTNormalization for a
    channel named "CT" (case-insensitive) and z-score for anything else.
    """
    n_channels = len(ours["channel_names"])
    return {
        "channel_names": {str(i): name for i, name in enumerate(ours["channel_names"])},
        "labels": dict(ours["labels"]),
        "numTraining": len(ours["cases"]),
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "dataset": {
            case: {
                "images": [f"imagesTr/{case}_{c:04d}{FILE_ENDING}" for c in range(n_channels)],
                "label": f"labelsTr/{case}{FILE_ENDING}",
            }
            for case in sorted(ours["cases"])
        },
    }


def dataset_folder_name(ours: dict[str, Any], dataset_id: int) -> str:
    """nnU-Net finds datasets by the DatasetXXX_ prefix; keep the rest filesystem-safe."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(ours.get("dataset", "Fingerprint")))
    return f"Dataset{dataset_id:03d}_{name}"


def summarize_plans(plans: dict[str, Any]) -> dict[str, Any]:
    """Keep the plan fields we compare against autoseg, one entry per real configuration."""
    out: dict[str, Any] = {"transpose_forward": plans["transpose_forward"], "configurations": {}}
    for name in CONFIGURATIONS:
        conf = plans["configurations"].get(name)
        if conf is None:
            continue
        arch = conf["architecture"]["arch_kwargs"]
        out["configurations"][name] = {
            "spacing": conf["spacing"],
            "patch_size": conf["patch_size"],
            "batch_size": conf["batch_size"],
            "median_image_size_in_voxels": conf["median_image_size_in_voxels"],
            "n_stages": arch["n_stages"],
            "strides": arch["strides"],
            "kernel_sizes": arch["kernel_sizes"],
            "features_per_stage": arch["features_per_stage"],
            "normalization_schemes": conf["normalization_schemes"],
            "use_mask_for_norm": conf["use_mask_for_norm"],
            "batch_dice": conf["batch_dice"],
            "network_class_name": conf["architecture"]["network_class_name"],
            "n_blocks_per_stage": arch.get("n_blocks_per_stage"),
            "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
        }
    return out


def plan_from_fingerprint(
    ours: dict[str, Any], work: Path, dataset_id: int, gpu_memory_gb: float, planner: str = "ExperimentPlanner"
) -> dict[str, Any]:
    """Lay out the scratch nnU-Net tree, run nnU-Net's planner (default: ExperimentPlanner; or one of
    nnUNetPlannerResEncM/L/XL), return the saved plans."""
    folder = dataset_folder_name(ours, dataset_id)
    raw, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    for root in (raw, pre, res):
        # save_plans merges into an existing plans file, so start from a clean slate.
        shutil.rmtree(root / folder, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    (raw / folder).mkdir()
    (pre / folder).mkdir()
    (raw / folder / "dataset.json").write_text(json.dumps(to_nnunet_dataset_json(ours), indent=1))
    (pre / folder / "dataset_fingerprint.json").write_text(json.dumps(to_nnunet_fingerprint(ours), indent=1))

    # This is nnU-Net's own process: its path variables are read lazily from os.environ.
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncL,
        nnUNetPlannerResEncM,
        nnUNetPlannerResEncXL,
    )

    planners = {
        c.__name__: c for c in (ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL)
    }
    with contextlib.redirect_stdout(sys.stderr):
        chosen = planners[planner](folder, gpu_memory_target_in_gb=gpu_memory_gb)
        chosen.plan_experiment()
    return json.loads((pre / folder / f"{chosen.plans_identifier}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fingerprint", type=Path, help="our fingerprint JSON")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch dir for nnUNet_raw/_preprocessed/_results (default: a temp dir, removed)",
    )
    parser.add_argument("--dataset-id", type=int, default=999)
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0)
    args = parser.parse_args()

    ours = json.loads(args.fingerprint.read_text())
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnunet_plan_")))
        plans = plan_from_fingerprint(ours, work.resolve(), args.dataset_id, args.gpu_memory_gb)

    from importlib.metadata import version

    print(
        json.dumps(
            {
                "tool": "nnunetv2",
                "version": version("nnunetv2"),
                "dataset": ours.get("dataset"),
                **summarize_plans(plans),
            }
        )
    )


if __name__ == "__main__":
    main()
