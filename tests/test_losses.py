"""Losses on inputs with known answers."""

from __future__ import annotations

import pytest
import torch

from autoseg.model.losses import DeepSupervisionLoss, SegmentationLoss, confusion_counts, region_targets, soft_dice


def perfect_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels[:, 0], classes).movedim(-1, 1).float() * 40 - 20


def test_soft_dice_known_value():
    p = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    g = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    assert soft_dice(p, g, batch_dice=False).item() == pytest.approx(2 / 3, abs=1e-4)


def test_label_loss_near_zero_for_perfect_prediction_and_high_for_wrong():
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = SegmentationLoss(None, batch_dice=False)
    assert loss(perfect_logits(labels, 3), labels).item() < 1e-3
    wrong = perfect_logits((labels + 1) % 3, 3)
    assert loss(wrong, labels).item() > 1.5


def test_region_targets_and_loss():
    labels = torch.tensor([0, 1, 2, 3]).view(1, 1, 4)
    regions = [[1, 2, 3], [2, 3], [3]]
    onehot = region_targets(labels, regions)
    assert onehot[0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    loss = SegmentationLoss(regions, batch_dice=True)
    assert loss(onehot * 40 - 20, labels).item() < 1e-3


def test_deep_supervision_downsamples_targets_and_zero_weight_adds_nothing():
    labels = torch.randint(0, 2, (1, 1, 8, 8, 8))
    outputs = [perfect_logits(labels, 2), torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 2, 2, 2)]
    loss = DeepSupervisionLoss(SegmentationLoss(None, False), [0.5, 0.5, 0.0])
    value = loss(outputs, labels)
    expected = 0.5 * SegmentationLoss(None, False)(
        outputs[1], labels[:, :, 1::2, 1::2, 1::2]
    )  # nearest-exact picks pixel centres
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)


def test_confusion_counts():
    labels = torch.tensor([0, 1, 1, 2]).view(1, 1, 4)
    logits = perfect_logits(torch.tensor([0, 1, 2, 2]).view(1, 1, 4), 3)
    tp, fp, fn = confusion_counts(logits, labels, None)
    assert tp.tolist() == [1, 1] and fp.tolist() == [0, 1] and fn.tolist() == [1, 0]


def test_ignore_label_voxels_do_not_count():
    labels = torch.randint(0, 3, (2, 1, 6, 6, 6))
    logits = perfect_logits(labels, 3)
    partial = labels.clone()
    partial[:, :, :3] = 3  # half the volume unannotated
    wrong = logits.clone()
    wrong[:, :, :3] = -wrong[:, :, :3]  # any prediction there
    loss = SegmentationLoss(None, batch_dice=False, ignore_label=3)
    assert loss(wrong, partial).item() < 1e-3
    region_loss = SegmentationLoss([[1, 2], [2]], batch_dice=True, ignore_label=3)
    onehot = region_targets(torch.where(partial == 3, 0, partial), [[1, 2], [2]]) * 40 - 20
    onehot[:, :, :3] = 20
    assert region_loss(onehot, partial).item() < 1e-3
    tp, fp, fn = confusion_counts(wrong, partial, None, ignore_label=3)
    assert fp.sum() == 0 and fn.sum() == 0
