"""plans.json is validated key by key on load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from autoseg.core.errors import PlanError
from autoseg.core.plan import load_plan, plan_from_json

REFERENCE = Path(__file__).resolve().parents[1] / "plans" / "Task01_BrainTumour" / "plans.json"


@pytest.fixture
def plan_json() -> dict:
    return json.loads(REFERENCE.read_text())


def test_unknown_key_is_named(plan_json):
    plan_json["configurations"]["3d_fullres"]["patch_sise"] = [1, 2, 3]
    with pytest.raises(PlanError, match=r"configurations\.3d_fullres: unknown key\(s\) \['patch_sise'\]"):
        plan_from_json(plan_json)


def test_missing_key_is_named(plan_json):
    del plan_json["configurations"]["2d"]["batch_size"]
    with pytest.raises(PlanError, match=r"configurations\.2d: missing key 'batch_size'"):
        plan_from_json(plan_json)


def test_wrong_type_is_named(plan_json):
    plan_json["configurations"]["3d_fullres"]["network"]["strides"][1] = "2x2x2"
    with pytest.raises(PlanError, match=r"network\.strides\[1\]"):
        plan_from_json(plan_json)


def test_wrong_version_is_refused(plan_json):
    plan_json["version"] = 99
    with pytest.raises(PlanError, match="version 99"):
        plan_from_json(plan_json)


def test_unknown_configuration_lists_known_ones():
    plan = load_plan(REFERENCE)
    with pytest.raises(PlanError, match="3d_fullres"):
        plan.configuration("3d_cascade")


def test_edited_plan_is_honoured(plan_json, tmp_path):
    edited = copy.deepcopy(plan_json)
    edited["configurations"]["3d_fullres"]["batch_size"] = 4
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(edited))
    assert load_plan(path).configurations["3d_fullres"].batch_size == 4


def test_unreadable_plan_file(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("{ not json")
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(path)
