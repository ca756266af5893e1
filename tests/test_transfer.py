"""Weights of one model into a network for other channels and classes: what loads, adapts and restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoseg.core.errors import CheckpointError
from autoseg.core.plan import load_plan
from autoseg.model.network import build_network
from autoseg.training.transfer import INPUT_LAYER, Pretrained, transfer_weights

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


def pretrained(weights: dict[str, torch.Tensor], regions: bool = False) -> Pretrained:
    return Pretrained(weights, tuple(SOURCE_CHANNELS), tuple(SOURCE_CLASSES), "source.pt", regions)


def test_same_classes_other_channels(source):
    target = network(3, 4)
    fresh_first = target.state_dict()[INPUT_LAYER].clone()
    report = transfer_weights(target, pretrained(source), ["t2w", "T1-Gd", "ADC"], SOURCE_CLASSES, regions=False)
    first = target.state_dict()[INPUT_LAYER]
    assert torch.equal(first[:, 0], source[INPUT_LAYER][:, 3])  # T2w found by name, case-insensitively
    assert torch.equal(first[:, 1], source[INPUT_LAYER][:, 2])  # T1-Gd = T1gd
    assert torch.allclose(first[:, 2], source[INPUT_LAYER].mean(dim=1))  # ADC is new: the mean
    assert not torch.equal(first, fresh_first)
    assert report.adapted == [INPUT_LAYER] and not report.reinitialised
    assert any("ADC" in n for n in report.notes) and any("FLAIR" in n and "T1w" in n for n in report.notes)
    heads = [k for k in source if k.startswith("heads.")]
    assert all(torch.equal(target.state_dict()[k], source[k]) for k in heads)


def test_classes_of_the_same_name_keep_their_head_rows_the_others_start_fresh(source):
    """Every deep-supervision head: background and Edema (= edema) take the source's rows, tumour core
    (a union of two source labels) and liver keep the new network's own initialisation."""
    torch.manual_seed(1)  # not the source's initialisation
    target = build_network(CONFIG, 4, 4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    classes = ["background", "Edema", "tumour core", "liver"]
    report = transfer_weights(target, pretrained(source), SOURCE_CHANNELS, classes, regions=False)
    after = target.state_dict()
    heads = [k for k in after if k.startswith("heads.")]
    assert len(heads) > 2 and set(report.adapted) == set(heads) and not report.reinitialised
    for k in heads:
        assert torch.equal(after[k][0], source[k][0]) and torch.equal(after[k][1], source[k][1])
        assert torch.equal(after[k][2:], before[k][2:])  # fresh: weights drawn anew, biases 0
        assert k.endswith(".bias") or not torch.equal(after[k][2:], source[k][2:])
    assert report.classes_copied == ["background", "Edema"] and report.classes_fresh == ["tumour core", "liver"]
    assert any("copied from the source by name" in n and "liver" in n for n in report.notes)
    body = [k for k in after if not k.startswith("heads.")]
    assert all(torch.equal(after[k], source[k]) for k in body) and len(report.loaded) == len(body)


def test_no_class_in_common_or_another_kind_restarts_the_heads(source):
    """Regions (sigmoid) never take label (softmax) rows, even of the same name: their logits mean other
    things."""
    for classes, regions in ((["liver", "tumour"], False), (["background", "edema"], True)):
        target = network(4, len(classes))
        before = {k: v.clone() for k, v in target.state_dict().items()}
        report = transfer_weights(target, pretrained(source), SOURCE_CHANNELS, classes, regions=regions)
        heads = [k for k in before if k.startswith("heads.")]
        assert set(report.reinitialised) == set(heads) and not report.classes_copied
        assert report.classes_fresh == classes
        assert all(torch.equal(target.state_dict()[k], before[k]) for k in heads)
    assert any("regions (sigmoid)" in n for n in report.notes)


def test_another_topology_is_refused(source):
    import dataclasses

    smaller = dataclasses.replace(CONFIG.network, features_per_stage=[16, 32, 64, 128, 256, 320])
    target = build_network(dataclasses.replace(CONFIG, network=smaller), 4, 4)
    with pytest.raises(CheckpointError, match="plan --like"):
        transfer_weights(target, pretrained(source), SOURCE_CHANNELS, SOURCE_CLASSES, regions=False)


def test_a_channel_map_takes_a_named_channels_filters_and_no_channel_in_common_takes_the_mean(source):
    """A CT task on a brain MRI model: `plan --channel-map CT=FLAIR` gives CT the FLAIR filters; without a
    map, CT starts from the mean of the model's filters, and the report says so."""
    mapped = network(1, 4)
    transfer_weights(mapped, pretrained(source), ["CT"], SOURCE_CLASSES, regions=False, channel_map={"CT": "FLAIR"})
    assert torch.equal(mapped.state_dict()[INPUT_LAYER][:, 0], source[INPUT_LAYER][:, 0])
    unmapped = network(1, 4)
    report = transfer_weights(unmapped, pretrained(source), ["CT"], SOURCE_CLASSES, regions=False)
    assert torch.allclose(unmapped.state_dict()[INPUT_LAYER][:, 0], source[INPUT_LAYER].mean(dim=1))
    assert any("no channel in common" in n and "--channel-map" in n for n in report.notes)
