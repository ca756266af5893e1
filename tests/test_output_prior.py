"""The heads' initial bias: the class shares of the training cases, so an untrained network predicts them."""

from __future__ import annotations

import math

import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import load_checkpoint
from autoseg.core.plan import load_plan
from autoseg.core.workspace import find_dataset
from autoseg.data.io import splits
from autoseg.data.preprocessing.fingerprint import load_fingerprint
from autoseg.model.network import build_network
from autoseg.phantoms import synthetic
from autoseg.training import output_prior
from autoseg.training.trainer import train_fold


class _Plan:
    """The two things :func:`output_prior.class_shares` reads of a plan."""

    def __init__(self, labels: dict[str, int], regions=()):
        self.labels, self.regions = labels, list(regions)


class _Region:
    def __init__(self, labels: list[int]):
        self.labels = labels


def _fingerprint() -> dict:
    return {
        "cases": {
            "a": {"shape_after_crop": [10, 10, 10], "label_voxels": {"1": 20, "2": 30}},
            "b": {"shape_after_crop": [10, 10, 10], "label_voxels": {"1": 80}},
            "c": {"shape_after_crop": [5, 5, 5], "label_voxels": {"1": 125}},  # a validation case
        }
    }


def test_the_shares_count_the_training_cases_only():
    shares = output_prior.class_shares(_fingerprint(), _Plan({"background": 0, "x": 1, "y": 2}), ["a", "b"])
    assert shares == pytest.approx([1 - 0.05 - 0.015, 0.05, 0.015])
    regions = _Plan({"background": 0, "x": 1, "y": 2}, [_Region([1, 2]), _Region([2])])
    assert output_prior.class_shares(_fingerprint(), regions, ["a", "b"]) == pytest.approx([0.065, 0.015])
    assert output_prior.class_shares(_fingerprint(), regions, ["unknown"]) is None


def test_the_bias_makes_the_outputs_predict_the_shares():
    shares = [0.9, 0.06, 0.04]
    assert torch.softmax(torch.tensor(output_prior.head_bias(shares, regions=False)), 0).tolist() == pytest.approx(
        shares
    )
    assert torch.sigmoid(torch.tensor(output_prior.head_bias([0.2, 0.05], regions=True))).tolist() == pytest.approx(
        [0.2, 0.05]
    )
    # a class no training case holds keeps a finite logit at the floor
    absent = output_prior.head_bias([0.99, 0.01, 0.0], regions=False)
    assert all(math.isfinite(b) for b in absent)
    assert torch.softmax(torch.tensor(absent), 0)[2] == pytest.approx(output_prior.MIN_SHARE, rel=0.02)
    assert output_prior.head_bias([0.0, 1.0], regions=True) == pytest.approx(
        [math.log(1e-3 / (1 - 1e-3)), math.log((1 - 1e-3) / 1e-3)]
    )


def test_an_untrained_network_with_the_bias_predicts_the_shares_on_a_blank_input(tmp_path):
    dataset = synthetic.write_msd_brain(tmp_path / "raw", 2, shape=(24, 28, 26))
    work = tmp_path / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    plan = load_plan(find_dataset(work, None).plans)
    shares = [0.9, 0.05, 0.03, 0.02]
    network = build_network(
        plan.configuration("3d_fullres"), 4, plan.num_classes, False, output_prior.head_bias(shares, False)
    )
    for head in network.heads:
        torch.nn.init.zeros_(head.weight)  # only the bias speaks
    with torch.no_grad():
        probabilities = torch.softmax(network.eval()(torch.zeros(1, 4, 24, 28, 24)), 1)
    assert probabilities.mean((0, 2, 3, 4)).tolist() == pytest.approx(shares)


def test_training_starts_from_the_training_cases_shares(tmp_path):
    """One SGD step moves a bias by at most about the learning rate: the trained heads still hold the prior
    (0 everywhere before it existed, far from log(share) of a class that fills a few percent)."""
    dataset = synthetic.write_msd_brain(tmp_path / "raw", 5, shape=(24, 28, 26))
    work = tmp_path / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    workspace = find_dataset(work, None)
    plan = load_plan(workspace.plans)
    train_ids, _ = splits.fold_cases(splits.read_splits(workspace.splits, workspace.name), "0", workspace.name)
    shares = output_prior.class_shares(load_fingerprint(workspace.fingerprint), plan, train_ids)
    assert min(shares[1:]) < 0.1 and shares[0] > 0.7  # a tumour fills a few percent of the brain
    train_fold(
        workdir=work, fold="0", epochs=1, iterations=1, val_iterations=1, workers=0, device="cpu", show_progress=False
    )
    weights = load_checkpoint(workspace.model("3d_fullres", "0") / "checkpoint_final.pt")["weights"]
    expected = torch.tensor(output_prior.head_bias(shares, regions=False))
    heads = [v for k, v in weights.items() if k.startswith("heads.") and k.endswith(".bias")]
    assert len(heads) == len(plan.configuration("3d_fullres").network.features_per_stage) - 1
    for bias in heads:
        assert torch.allclose(bias.float(), expected, atol=0.05), (bias, expected)
