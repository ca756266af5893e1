"""The U-Net matches the planner's topology and activation model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoseg.core.plan import load_plan
from autoseg.model.network import build_network, deep_supervision_weights, parameter_count
from autoseg.planning.planner import plan_configuration
from autoseg.planning.topology import activation_elements

PLANS = Path(__file__).resolve().parents[1] / "plans"


def count_conv_outputs(model, x) -> int:
    total = 0

    def hook(_, __, out):
        nonlocal total
        total += out[0].numel()

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize(
    "spacing,median", [([1.0, 1.0, 1.0], [40, 48, 40]), ([3.0, 0.8, 0.8], [20, 64, 64]), ([1.0, 1.0], [64, 48])]
)
def test_activation_estimate_agrees_with_network(spacing, median):
    config = plan_configuration(
        "c",
        spacing,
        median,
        num_classes=3,
        dataset_voxels=1e9,
        gpu_memory_gb=8,
        normalization=[],
        batch_dice=False,
        data_identifier="c",
    )
    model = build_network(config, in_channels=2, num_classes=3, deep_supervision=False)
    x = torch.zeros(1, 2, *config.patch_size)
    assert count_conv_outputs(model, x) == config.activation_estimate
    assert config.activation_estimate == activation_elements(
        config.patch_size, config.network.strides, config.network.features_per_stage, 3
    )


def test_deep_supervision_outputs_and_shapes():
    config = plan_configuration(
        "c",
        [1.0, 1.0, 1.0],
        [32, 32, 32],
        num_classes=4,
        dataset_voxels=1e9,
        gpu_memory_gb=8,
        normalization=[],
        batch_dice=False,
        data_identifier="c",
    )
    model = build_network(config, in_channels=1, num_classes=4).train()
    outputs = model(torch.zeros(2, 1, *config.patch_size))
    assert len(outputs) == config.network.n_stages - 1
    assert outputs[0].shape == (2, 4, *config.patch_size)
    assert outputs[1].shape[2:] == tuple(p // 2 for p in config.patch_size)
    assert model.eval()(torch.zeros(1, 1, *config.patch_size)).shape == (1, 4, *config.patch_size)


def test_task01_parameter_count():
    plan = load_plan(PLANS / "Task01_BrainTumour" / "plans.json")
    model = build_network(plan.configurations["3d_fullres"], in_channels=4, num_classes=plan.num_classes)
    assert 31.0e6 < parameter_count(model) < 31.4e6  # nnU-Net's PlainConvUNet for this plan: ~31.2 M
    from autoseg.model.network import network_parameters  # what `plan` and `info` print, counted on the meta device

    assert network_parameters(plan, plan.configurations["3d_fullres"]) == parameter_count(model)


def test_deep_supervision_weights():
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert deep_supervision_weights(1) == [1.0]


def test_weights_of_another_network_are_a_clear_error():
    from autoseg.core.checkpoint import load_weights
    from autoseg.core.errors import CheckpointError

    config = plan_configuration(
        "c",
        [1.0, 1.0, 1.0],
        [32, 32, 32],
        num_classes=4,
        dataset_voxels=1e9,
        gpu_memory_gb=8,
        normalization=[],
        batch_dice=False,
        data_identifier="c",
    )
    four = build_network(config, in_channels=4, num_classes=4)
    one = build_network(config, in_channels=1, num_classes=4)
    load_weights(four, build_network(config, in_channels=4, num_classes=4).state_dict(), "fold 0")
    with pytest.raises(CheckpointError, match=r"fold 0 does not fit the network plans.json describes \(size mism"):
        load_weights(one, four.state_dict(), "fold 0")
