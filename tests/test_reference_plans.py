"""Every plan in plans/ is re-derived from its fingerprint; any difference fails.

After an intended planner change run ``python plans/regenerate.py`` and review the diff.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.core.plan import load_plan, plan_from_json, to_json
from autoseg.data.preprocessing.fingerprint import load_fingerprint
from autoseg.planning.planner import plan_from_fingerprint

PLANS = Path(__file__).resolve().parents[1] / "plans"
REFERENCES = sorted(p.parent.name for p in PLANS.glob("*/fingerprint.json"))


def test_reference_set_covers_different_characters():
    assert {"Task01_BrainTumour", "Task07_Pancreas", "Task05_Prostate"} <= set(REFERENCES)


@pytest.mark.parametrize("name", REFERENCES)
def test_reference_plan_is_reproduced_exactly(name: str):
    derived = to_json(plan_from_fingerprint(load_fingerprint(PLANS / name / "fingerprint.json")))
    stored = json.loads((PLANS / name / "plans.json").read_text())
    assert json.loads(json.dumps(derived)) == stored, f"plan for {name} changed; run plans/regenerate.py and review"


@pytest.mark.parametrize("name", REFERENCES)
def test_reference_plan_round_trips_through_the_loader(name: str):
    plan = load_plan(PLANS / name / "plans.json")
    assert plan_from_json(json.loads(json.dumps(to_json(plan)))) == plan


def test_task01_reference_numbers():
    plan = load_plan(PLANS / "Task01_BrainTumour" / "plans.json")
    full = plan.configurations["3d_fullres"]
    assert (full.patch_size, full.batch_size, full.network.n_stages) == ([128, 128, 128], 2, 6)
    assert full.network.kernel_sizes == [[3, 3, 3]] * 6
    assert all(n.scheme == "zscore" and n.use_mask for n in full.normalization)
    assert "3d_lowres" not in plan.configurations


def test_anisotropic_ct_plans_in_plane_first():
    plan = load_plan(PLANS / "Task07_Pancreas" / "plans.json")
    full = plan.configurations["3d_fullres"]
    assert full.spacing[0] > 3 * full.spacing[1]
    assert full.network.kernel_sizes[0] == [1, 3, 3]
    assert full.normalization[0].scheme == "ct"
    assert "3d_lowres" in plan.configurations


NNUNET_CASES = json.loads((Path(__file__).parent / "data" / "nnunet_planner_cases.json").read_text())["cases"]
NNUNET_NORMALIZATION = {"ZScoreNormalization": "zscore", "CTNormalization": "ct"}


@pytest.mark.parametrize("case", NNUNET_CASES, ids=[c["fingerprint"]["dataset"] for c in NNUNET_CASES])
def test_plans_equal_nnunets_own_planner_on_even_case_counts(case: dict):
    """nnU-Net's planner (written by benchmarks/nnunet_planner_cases.py) plans with unrounded medians."""
    plan = plan_from_fingerprint(case["fingerprint"])
    theirs = case["nnunet"]
    assert plan.transpose_forward == theirs["transpose_forward"]
    assert set(_planned(plan)) == set(theirs["configurations"])
    for name, expected in theirs["configurations"].items():
        ours = plan.configurations[name]
        assert ours.spacing == pytest.approx(expected["spacing"]), name
        assert ours.median_shape == [round(v) for v in expected["median_image_size_in_voxels"]], name
        assert (ours.patch_size, ours.batch_size, ours.batch_dice) == (
            expected["patch_size"],
            expected["batch_size"],
            expected["batch_dice"],
        ), name
        assert ours.network.strides == expected["strides"], name
        assert ours.network.kernel_sizes == expected["kernel_sizes"], name
        assert ours.network.features_per_stage == expected["features_per_stage"], name
        assert [n.scheme for n in ours.normalization] == [
            NNUNET_NORMALIZATION[s] for s in expected["normalization_schemes"]
        ], name


def _planned(plan) -> list[str]:
    """The configurations nnU-Net plans a network for: the cascade (a variant of 3d_fullres, which nnU-Net's
    plans hold as ``{"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}`` whenever it plans both; the
    benchmark records only the real ones) is there exactly when 3d_lowres is."""
    assert ("3d_cascade_fullres" in plan.configurations) == ("3d_lowres" in plan.configurations)
    return [n for n, c in plan.configurations.items() if c.previous_stage is None]


RESENC_FILE = Path(__file__).parent / "data" / "nnunet_resenc_planner_cases.json"
RESENC_CASES = json.loads(RESENC_FILE.read_text())["cases"]


PLANNER_FINGERPRINTS = {c["fingerprint"]["dataset"]: c["fingerprint"] for c in NNUNET_CASES}


def _resenc_fingerprint(case: dict) -> dict:
    if "reference" in case:
        return load_fingerprint(PLANS / case["reference"] / "fingerprint.json")
    return PLANNER_FINGERPRINTS[case["planner_case"]]


@pytest.mark.parametrize("case", RESENC_CASES, ids=[c.get("reference") or c["planner_case"] for c in RESENC_CASES])
@pytest.mark.parametrize("preset", ["resenc-m", "resenc-l", "resenc-xl"])
def test_resenc_presets_equal_nnunets_resenc_planners(case: dict, preset: str):
    """nnU-Net's nnUNetPlannerResEncM/L/XL (benchmarks/nnunet_planner_cases.py --resenc) on the same fingerprints."""
    from autoseg.planning.planner import PRESETS

    fingerprint = _resenc_fingerprint(case)
    plan = plan_from_fingerprint(fingerprint, PRESETS[preset].gpu_memory_gb, preset=preset)
    theirs = case["nnunet"][preset]
    assert plan.transpose_forward == theirs["transpose_forward"]
    assert set(_planned(plan)) == set(theirs["configurations"])
    for name, expected in theirs["configurations"].items():
        ours = plan.configurations[name]
        assert ours.spacing == pytest.approx(expected["spacing"]), name
        assert (ours.patch_size, ours.batch_size, ours.batch_dice) == (
            expected["patch_size"],
            expected["batch_size"],
            expected["batch_dice"],
        ), name
        assert ours.network.architecture == "residual_encoder"
        assert ours.network.strides == expected["strides"], name
        assert ours.network.kernel_sizes == expected["kernel_sizes"], name
        assert ours.network.features_per_stage == expected["features_per_stage"], name
        assert ours.network.blocks_per_stage == expected["n_blocks_per_stage"], name
        assert [ours.network.convs_per_stage_decoder] * (ours.network.n_stages - 1) == expected[
            "n_conv_per_stage_decoder"
        ], name


def test_presets_join_the_plan_as_configurations_sharing_preprocessed_data():
    from autoseg.planning.planner import with_presets

    fingerprint = load_fingerprint(PLANS / "Task05_Prostate" / "fingerprint.json")
    plan = with_presets(plan_from_fingerprint(fingerprint), fingerprint, ["resenc-l"])
    resenc = plan.configuration("3d_fullres_resenc_l")
    assert resenc.data_identifier == plan.configuration("3d_fullres").data_identifier
    assert resenc.network.architecture == "residual_encoder"
    assert plan_from_json(json.loads(json.dumps(to_json(plan)))) == plan
