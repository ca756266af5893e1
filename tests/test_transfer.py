"""Weights of one model into a network for other channels and classes: what loads, adapts and restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoseg.core.errors import CheckpointError
from autoseg.core.plan import load_plan
from autoseg.model.network import build_network
from autoseg.training.transfer import INPUT_LAYER, transfer_weights

PLAN = load_plan(Path(__file__).resolve().parents[1] / "plans" / "Task01_BrainTumour" / "plans.json")
CONFIG = PLAN.configurations["3d_fullres"]
SOURCE_CHANNELS = ["FLAIR", "T1w", "T1gd", "T2w"]
SOURCE_CLASSES = ["background", "edema", "non-enhancing tumor", "enhancing tumour"]


def network(channels: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(channels * 10 + classes)
    return build_network(CONFIG, channels, classes)


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return network(4, 4).state_dict()


def test_same_classes_other_channels(source):
    target = network(3, 4)
    fresh_first = target.state_dict()[INPUT_LAYER].clone()
    report = transfer_weights(target, source, SOURCE_CHANNELS, SOURCE_CLASSES, ["t2w", "T1-Gd", "ADC"],
                              SOURCE_CLASSES, "source.pt")
    first = target.state_dict()[INPUT_LAYER]
    assert torch.equal(first[:, 0], source[INPUT_LAYER][:, 3])  # T2w found by name, case-insensitively
    assert torch.equal(first[:, 1], source[INPUT_LAYER][:, 2])  # T1-Gd = T1gd
    assert torch.allclose(first[:, 2], source[INPUT_LAYER].mean(dim=1))  # ADC is new: the mean
    assert not torch.equal(first, fresh_first)
    assert report.adapted == [INPUT_LAYER] and not report.reinitialised
    assert any("ADC" in n for n in report.notes) and any("FLAIR" in n and "T1w" in n for n in report.notes)
    heads = [k for k in source if k.startswith("heads.")]
    assert all(torch.equal(target.state_dict()[k], source[k]) for k in heads)


def test_other_classes_restart_the_heads_only(source):
    target = network(4, 3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source, SOURCE_CHANNELS, SOURCE_CLASSES, SOURCE_CHANNELS,
                              ["background", "liver", "tumour"], "source.pt")
    after = target.state_dict()
    heads = [k for k in after if k.startswith("heads.")]
    assert set(report.reinitialised) == set(heads)
    assert all(torch.equal(after[k], before[k]) for k in heads)
    body = [k for k in after if not k.startswith("heads.")]
    assert all(torch.equal(after[k], source[k]) for k in body) and len(report.loaded) == len(body)


def test_another_topology_is_refused(source):
    import dataclasses

    smaller = dataclasses.replace(CONFIG.network, features_per_stage=[16, 32, 64, 128, 256, 320])
    target = build_network(dataclasses.replace(CONFIG, network=smaller), 4, 4)
    with pytest.raises(CheckpointError, match="plan --like"):
        transfer_weights(target, source, SOURCE_CHANNELS, SOURCE_CLASSES, SOURCE_CHANNELS, SOURCE_CLASSES, "x.pt")
