"""Dice + cross-entropy (labels) or Dice + BCE (regions), with deep supervision.

Dice is soft Dice over the foreground classes (all regions in region mode), smooth
1e-5; with ``batch_dice`` the sums also run over the batch (and, under DDP, over all
ranks) so rare structures count as one pseudo-volume. The voxel-wise term is plain
cross-entropy (``dice_ce``), focal (``dice_focal``, gamma 2: easy voxels weigh less) or
TopK (``dice_topk``: the hardest 10 % of voxels only). Losses are reported as
``1 - Dice`` (positive, 0 at perfection) rather than nnU-Net's ``-Dice``: same
gradients, readable logs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SMOOTH = 1e-5
FOCAL_GAMMA = 2.0
TOPK_FRACTION = 0.1


def region_targets(labels: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(B, 1, *sp)`` label map -> ``(B, R, *sp)`` float masks, one per region."""
    masks = [torch.isin(labels[:, 0], torch.as_tensor(list(r), device=labels.device)) for r in regions]
    return torch.stack(masks, dim=1).float()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor)
    return tensor


def soft_dice(
    probabilities: torch.Tensor, targets: torch.Tensor, batch_dice: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean soft Dice over channels; ``targets`` one-hot like ``probabilities``."""
    axes = tuple(range(2, probabilities.ndim))
    if mask is not None:
        probabilities, targets = probabilities * mask, targets * mask
    intersection = (probabilities * targets).sum(axes)
    total = probabilities.sum(axes) + targets.sum(axes)
    if batch_dice:
        intersection, total = _all_reduce_sum(intersection.sum(0)), _all_reduce_sum(total.sum(0))
    dice = (2 * intersection + SMOOTH) / torch.clamp(total + SMOOTH, min=1e-8)
    return dice.mean()


class SegmentationLoss(nn.Module):
    """Loss on one output resolution; ``target`` is the integer label map ``(B, 1, *sp)``.

    Voxels labelled ``ignore_label`` (partial annotations) count in neither term.
    """

    def __init__(
        self,
        regions: Sequence[Sequence[int]] | None,
        batch_dice: bool,
        ignore_label: int | None = None,
        variant: str = "dice_ce",
    ) -> None:
        super().__init__()
        if variant not in ("dice_ce", "dice_focal", "dice_topk"):
            raise ValueError(f"unknown loss variant {variant!r}")
        self.regions = [list(r) for r in regions] if regions else None
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.variant = variant

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        mask = None
        if self.ignore_label is not None:
            annotated = target != self.ignore_label
            mask = annotated.float()
            target = torch.where(annotated, target, torch.zeros_like(target))
        if self.regions:
            onehot = region_targets(target, self.regions)
            bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            valid = None if mask is None else mask.expand_as(bce) > 0
            return (
                self._reduce(bce, valid, logits) + 1 - soft_dice(torch.sigmoid(logits), onehot, self.batch_dice, mask)
            )
        labels = target[:, 0].long()
        ce_labels = labels if mask is None else torch.where(mask[:, 0] > 0, labels, torch.full_like(labels, -100))
        ce_voxels = F.cross_entropy(logits, ce_labels, ignore_index=-100, reduction="none")
        ce = self._reduce(ce_voxels, None if mask is None else mask[:, 0] > 0, logits)
        probabilities = torch.softmax(logits, dim=1)[:, 1:]
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        return ce + 1 - soft_dice(probabilities, onehot, self.batch_dice, mask)

    def _reduce(self, voxel_loss: torch.Tensor, valid: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Mean of the voxel-wise term over annotated voxels: plain, focal-weighted or top-k."""
        if valid is not None:
            if not valid.any():
                return logits.sum() * 0
            voxel_loss = voxel_loss[valid]
        if self.variant == "dice_focal":
            voxel_loss = (1 - torch.exp(-voxel_loss)) ** FOCAL_GAMMA * voxel_loss
        elif self.variant == "dice_topk":
            flat = voxel_loss.reshape(-1)
            voxel_loss = flat.topk(max(1, int(flat.numel() * TOPK_FRACTION)), sorted=False).values
        return voxel_loss.mean()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum over outputs (highest resolution first); targets are downsampled by nearest."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.loss = loss
        self.weights = list(weights)

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        total = outputs[0].new_zeros(())
        for weight, output in zip(self.weights, outputs):
            # A zero-weighted output still enters the graph: DDP needs a gradient for every parameter.
            scaled = (
                target
                if output.shape[2:] == target.shape[2:]
                else F.interpolate(target.float(), size=output.shape[2:], mode="nearest-exact").to(target.dtype)
            )
            total = total + weight * self.loss(output, scaled)
        return total


def confusion_counts(
    logits: torch.Tensor, target: torch.Tensor, regions: Sequence[Sequence[int]] | None, ignore_label: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positives, false positives, false negatives per foreground class/region (pseudo-Dice)."""
    valid = torch.ones_like(target[:, 0], dtype=torch.bool) if ignore_label is None else target[:, 0] != ignore_label
    if ignore_label is not None:
        target = torch.where(target == ignore_label, torch.zeros_like(target), target)
    if regions:
        predicted = torch.sigmoid(logits.float()) > 0.5
        truth = region_targets(target, regions).bool()
    else:
        classes = logits.shape[1]
        predicted = F.one_hot(logits.argmax(1), classes).movedim(-1, 1)[:, 1:].bool()
        truth = F.one_hot(target[:, 0].long(), classes).movedim(-1, 1)[:, 1:].bool()
    predicted, truth = predicted & valid[:, None], truth & valid[:, None]
    axes = (0, *range(2, predicted.ndim))
    tp = (predicted & truth).sum(axes)
    fp = (predicted & ~truth).sum(axes)
    fn = (~predicted & truth).sum(axes)
    return tp, fp, fn
