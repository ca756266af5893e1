"""Training a cascade stage (nnU-Net's ``3d_cascade_fullres``): its previous stage's masks, and how they are augmented.

A cascade stage's network reads, beside the image, the previous stage's predicted mask one-hot (one channel per
foreground label, :attr:`autoseg.core.plan.Plan.stage_labels`). In training that mask is the previous stage's
cross-validation prediction of the case (from the fold that held it out, so it is as wrong as the masks
prediction will feed), which the previous stage's validation left on this stage's preprocessed grid
(:meth:`autoseg.core.workspace.DatasetWorkspace.next_stage`). :func:`stage_masks` finds them and refuses,
in one line, a fold whose masks are not all there.

The mask goes through the spatial augmentation with the image (the sampler hands it over as a second
``seg`` channel), then :func:`stage_steps` moves it into the image as one-hot channels and perturbs them
as nnU-Net does, so that the network does not copy its input: with probability 0.4 per sample each channel
(with probability 0.5) is dilated, eroded, opened or closed by a ball of radius 1 to 8 voxels
(:class:`RandomBinaryOperator`), and with probability 0.2 each channel (with probability 0.5) loses one
connected component covering under 15 % of the patch (:class:`RemoveRandomComponent`). nnU-Net runs these
as batchgeneratorsv2's transforms, whose imports need packages autoseg does not depend on; these are the
same operations with scipy (a ball of radius r is everything within distance r: a Euclidean distance
transform, not a convolution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from scipy import ndimage

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Configuration, Plan
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.io import splits

#: nnU-Net's cascade augmentation (nnUNetTrainer.get_training_transforms).
P_BINARY_OPERATOR = 0.4
P_REMOVE_COMPONENT = 0.2
P_PER_LABEL = 0.5
BALL_RADIUS = (1.0, 8.0)
MAX_REMOVED_SHARE = 0.15


def stage_masks(
    workspace: DatasetWorkspace, plan: Plan, config: Configuration, case_ids: Sequence[str]
) -> dict[str, Path]:
    """Case id -> the previous stage's mask of the case (``<case>.npy`` on ``config``'s grid), from the fold of
    the previous stage that held the case out; a WorkspaceError names the folds to train (or validate) first."""
    previous = config.previous_stage
    assert previous is not None
    folds = splits.read_splits(workspace.splits, workspace.name)
    held_out = {c: str(k) for k, fold in enumerate(folds) for c in fold["val"]}
    found, missing = {}, []
    for case_id in case_ids:
        fold = held_out.get(case_id)
        path = (
            workspace.next_stage(previous, fold, config.data_identifier) / f"{case_id}.npy"
            if fold is not None
            else None
        )
        if path is not None and path.is_file():
            found[case_id] = path
        else:
            missing.append(case_id)
    if missing:
        untrained = sorted({held_out[c] for c in missing if c in held_out}, key=int)
        raise WorkspaceError(
            f"{config.name} trains on {previous}'s cross-validation predictions, and {len(missing)} case(s) have "
            f"none (e.g. {missing[0]}): train every fold of {previous} first (missing: fold(s) "
            f"{', '.join(untrained) or 'none; the cases are in no validation set of splits.json'}; "
            f"`autoseg train -c {previous} --fold K`, or add --validate-only to a fold trained before {config.name} "
            "was planned)"
        )
    return found


def stage_steps(stage_labels: Sequence[int]) -> list[BasicTransform]:
    """Move the previous stage's mask (``seg`` channel 1) into the image as one-hot channels, then perturb
    them (nnU-Net's cascade steps, after the label clean-up)."""
    channels = list(range(-len(stage_labels), 0))
    return [
        MoveSegAsOneHotToDataTransform(1, list(stage_labels), remove_channel_from_source=True),
        RandomTransform(RandomBinaryOperator(channels), apply_probability=P_BINARY_OPERATOR),
        RandomTransform(RemoveRandomComponent(channels), apply_probability=P_REMOVE_COMPONENT),
    ]


def _chosen(channels: Sequence[int], p_per_label: float) -> list[int]:
    """The channels a perturbation touches this time, in random order (each with ``p_per_label``)."""
    order = list(channels)
    np.random.shuffle(order)
    return [c for c in order if np.random.uniform() < p_per_label]


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Every voxel within ``radius`` voxels of the mask."""
    return ndimage.distance_transform_edt(~mask) <= radius if mask.any() else mask.copy()


def erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """The mask's voxels farther than ``radius`` voxels from its outside (the patch border is not outside)."""
    return ndimage.distance_transform_edt(mask) > radius if not mask.all() else mask.copy()


OPERATORS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "dilate": dilate,
    "erode": erode,
    "open": lambda mask, r: dilate(erode(mask, r), r),
    "close": lambda mask, r: erode(dilate(mask, r), r),
}


class RandomBinaryOperator(ImageOnlyTransform):
    """Each chosen one-hot channel dilated, eroded, opened or closed by a ball of random radius; voxels a
    channel gains leave the other channels (nnU-Net's ApplyRandomBinaryOperatorTransform)."""

    def __init__(
        self, channels: Sequence[int], radius: tuple[float, float] = BALL_RADIUS, p_per_label: float = P_PER_LABEL
    ) -> None:
        super().__init__()
        self.channels, self.radius, self.p_per_label = list(channels), radius, p_per_label

    def get_parameters(self, **data_dict) -> dict:
        names = list(OPERATORS)
        return {
            "operations": [
                (c, names[np.random.randint(len(names))], float(np.random.uniform(*self.radius)))
                for c in _chosen(self.channels, self.p_per_label)
            ]
        }

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        for channel, operator, radius in params["operations"]:
            mask = img[channel].numpy() > 0
            result = OPERATORS[operator](mask, radius)
            gained = torch.from_numpy(result & ~mask)
            for other in self.channels:
                if other != channel:
                    img[other][gained] = 0
            img[channel] = torch.from_numpy(result).to(img.dtype)
        return img


class RemoveRandomComponent(ImageOnlyTransform):
    """Each chosen one-hot channel loses one of its connected components (26-connected) that covers under
    ``max_share`` of the patch, drawn at random (nnU-Net's RemoveRandomConnectedComponentFromOneHotEncodingTransform,
    never filling the hole with another class)."""

    def __init__(
        self, channels: Sequence[int], max_share: float = MAX_REMOVED_SHARE, p_per_label: float = P_PER_LABEL
    ) -> None:
        super().__init__()
        self.channels, self.max_share, self.p_per_label = list(channels), max_share, p_per_label

    def get_parameters(self, **data_dict) -> dict:
        return {"channels": _chosen(self.channels, self.p_per_label)}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        for channel in params["channels"]:
            mask = img[channel].numpy() > 0
            if not mask.any():
                continue
            components, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
            sizes = np.bincount(components.ravel())[1:]
            small = np.flatnonzero(sizes < self.max_share * mask.size) + 1
            if small.size:
                img[channel][torch.from_numpy(components == np.random.choice(small))] = 0
        return img
