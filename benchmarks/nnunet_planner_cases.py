"""Write nnU-Net's own plans for a set of synthetic fingerprints as test data for autoseg's planner.

Why: the reference plans in ``plans/`` cover four real datasets, all of which happen to give
whole-number median shapes. Datasets with an even number of cases have medians such as 109.5,
and nnU-Net plans with the unrounded value (the patch clip, the 5 % batch cap, the 3d_lowres
coverage and drop rules). These fingerprints are built to hit those paths, and the file this
writes, ``tests/data/nnunet_planner_cases.json``, holds nnU-Net's answer for each, so
``tests/test_reference_plans.py`` checks autoseg against nnU-Net itself, not against itself.

Run with the nnU-Net venv's python (``benchmarks/nnunet_env.sh`` makes it):

    .bench/nnunet-venv/bin/python benchmarks/nnunet_planner_cases.py

Prints a one-line JSON summary; nnU-Net's chatter goes to stderr.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_plans_from_fingerprint import plan_from_fingerprint, summarize_plans  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "nnunet_planner_cases.json"
#: nnU-Net's ResEnc planners' answers (``--resenc``): the same fingerprints (named by their dataset; the fingerprints
#: are in OUT) and the reference ones in plans/ (named by their folder).
RESENC_OUT = OUT.with_name("nnunet_resenc_planner_cases.json")
RESENC_PLANNERS = {"resenc-m": ("nnUNetPlannerResEncM", 8.0), "resenc-l": ("nnUNetPlannerResEncL", 24.0)}
RESENC_PLANNERS["resenc-xl"] = ("nnUNetPlannerResEncXL", 40.0)
PLANS = Path(__file__).resolve().parents[1] / "plans"
MRI_STATS = {
    "mean": 600.0,
    "std": 200.0,
    "median": 580.0,
    "min": 0.0,
    "max": 4000.0,
    "percentile_00_5": 100.0,
    "percentile_99_5": 1500.0,
}
CT_STATS = {
    "mean": 80.0,
    "std": 60.0,
    "median": 90.0,
    "min": -1024.0,
    "max": 3000.0,
    "percentile_00_5": -100.0,
    "percentile_99_5": 250.0,
}


def fingerprint(
    name: str, spacings: np.ndarray, shapes: np.ndarray, channels: list[str], labels: list[str], relative_size: float
) -> dict[str, Any]:
    """An autoseg fingerprint (the keys the planner reads) with the given per-case spacings and shapes."""
    stats = [CT_STATS if c.upper() == "CT" else MRI_STATS for c in channels]
    cases = {
        f"case_{i:03d}": {
            "spacing": [float(v) for v in sp],
            "shape_before_crop": [int(v) for v in sh],
            "shape_after_crop": [int(v) for v in sh],
            "label_voxels": {},
        }
        for i, (sp, sh) in enumerate(zip(spacings, shapes))
    }
    return {
        "version": 1,
        "dataset": name,
        "channel_names": channels,
        "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(labels)}},
        "cases": cases,
        "foreground_intensities": stats,
        "median_relative_size_after_crop": relative_size,
    }


def cases() -> list[dict[str, Any]]:
    """Fingerprints with even case counts, so that medians fall on halves."""
    rng = np.random.default_rng(12)
    out = []
    # 20 isotropic MRI cases, median z 109.5, in-plane 150 (patch 160): nnU-Net caps the 2d batch on the
    # unrounded median (96, not the 97 a rounded median gives).
    z = np.array([100 + i for i in range(10)] + [110 + i for i in range(10)])
    shapes = np.stack([z, np.full(20, 150), np.full(20, 150)], axis=1)
    out.append(fingerprint("even20_median_z_109_5", np.ones((20, 3)), shapes, ["T1"], ["tumour"], 0.8))
    # 4 small two-channel cases, halves on every axis.
    shapes = np.array([[41, 60, 51], [42, 61, 52], [45, 64, 55], [46, 65, 56]])
    out.append(fingerprint("even4_halves", np.full((4, 3), 1.5), shapes, ["T2", "ADC"], ["a", "b"], 0.9))
    # 30 anisotropic CT cases large enough for 3d_lowres.
    spacings = np.stack([rng.uniform(2.5, 5.0, 30), np.full(30, 0.78), np.full(30, 0.78)], axis=1)
    shapes = np.stack([rng.integers(60, 130, 30), rng.integers(380, 512, 30), rng.integers(380, 512, 30)], axis=1)
    out.append(fingerprint("aniso_ct_even30", spacings, shapes, ["CT"], ["liver", "tumour"], 0.4))
    # 40 large isotropic CT cases: 3d_lowres with its own batch cap.
    shapes = rng.integers(250, 420, (40, 3))
    out.append(fingerprint("iso_ct_even40", np.ones((40, 3)), shapes, ["CT"], ["organ"], 0.5))
    # 10 small cases where 3d_lowres is tried and dropped (too little size difference).
    shapes = np.stack([rng.integers(150, 200, 10), rng.integers(180, 260, 10), rng.integers(180, 260, 10)], axis=1)
    out.append(fingerprint("even10_lowres_edge", np.full((10, 3), 0.9), shapes, ["CT"], ["organ"], 0.6))
    return out


def resenc_main() -> None:
    """nnU-Net's ResEnc M/L/XL plans for the synthetic fingerprints and the reference ones (by name)."""
    from importlib.metadata import version

    fingerprints = [(fp, None) for fp in cases()]
    fingerprints += [(json.loads(p.read_text()), p.parent.name) for p in sorted(PLANS.glob("*/fingerprint.json"))]
    records = []
    with tempfile.TemporaryDirectory(prefix="nnunet_cases_") as tmp:
        for i, (fp, reference) in enumerate(fingerprints):
            answers = {
                preset: summarize_plans(plan_from_fingerprint(fp, Path(tmp), 900 + i, gpu, planner))
                for preset, (planner, gpu) in RESENC_PLANNERS.items()
            }
            records.append({"reference": reference} if reference else {"planner_case": fp["dataset"]})
            records[-1]["nnunet"] = answers
    RESENC_OUT.write_text(json.dumps({"tool": "nnunetv2", "version": version("nnunetv2"), "cases": records}, indent=1))
    print(json.dumps({"written": str(RESENC_OUT), "cases": len(records)}))


def main() -> None:
    from importlib.metadata import version

    if "--resenc" in sys.argv[1:]:
        resenc_main()
        return
    records = []
    with tempfile.TemporaryDirectory(prefix="nnunet_cases_") as tmp:
        for i, fp in enumerate(cases()):
            plans = plan_from_fingerprint(fp, Path(tmp), 900 + i, gpu_memory_gb=8.0)
            records.append({"fingerprint": fp, "nnunet": summarize_plans(plans)})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"tool": "nnunetv2", "version": version("nnunetv2"), "cases": records}, indent=1))
    print(
        json.dumps(
            {
                "written": str(OUT),
                "cases": {r["fingerprint"]["dataset"]: sorted(r["nnunet"]["configurations"]) for r in records},
            }
        )
    )


if __name__ == "__main__":
    main()
