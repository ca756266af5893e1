"""May bf16 stand in for fp32 for the chosen model? ``select`` checks it once per model.

bf16 convolutions run about twice as fast as fp32 on CPUs that have them natively (AVX512-BF16,
AMX; docs/performance.md), and usually change no class. "Usually" is not enough for a default,
so ``select`` predicts one validation case's central tile of every chosen fold in fp32 and in
bf16 and records how often the classes agree; ``predict --precision auto`` takes bf16 on such a
CPU only for a model whose check passed (:func:`autoseg.inference.choice.load_predictor`). A
model-level check, rather than one on the case being predicted, keeps a case's mask independent
of which other cases are predicted with it and in which order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Configuration, Plan
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.io.splits import fold_cases
from autoseg.data.preprocessing.pipeline import one_hot
from autoseg.inference.fold_ensemble import FoldEnsemble
from autoseg.inference.predictor import load_fold_ensemble
from autoseg.inference.sliding_window import as_tensor, predict_probabilities

log = logging.getLogger(__name__)
#: the share of a tile's voxels whose class bf16 must leave unchanged, in every fold checked
BF16_AGREEMENT = 0.999


def bf16_check(
    workspace: DatasetWorkspace,
    plan: Plan,
    folds: dict[str, Sequence[str]],
    splits: list[dict],
    checkpoint: str = "final",
) -> dict:
    """``inference.json``'s ``bf16`` entry: the lowest agreement over the chosen folds, and the verdict.

    Without a fold's weights or its preprocessed validation case (deleted to save space) there is
    nothing to check: bf16 is refused, with the reason, and ``predict`` stays fp32. A cascade stage's previous
    stage runs in the same precision: its same folds are checked too.
    """
    agreements = []
    for configuration in list(folds):
        previous = plan.configuration(configuration).previous_stage
        if previous is not None and previous not in folds:
            folds = {**folds, previous: folds[configuration]}
    for configuration, names in folds.items():
        config = plan.configuration(configuration)
        for fold in names:
            try:
                ensemble = load_fold_ensemble(
                    workspace, plan, configuration, [fold], checkpoint, device="cpu", tta=False, precision="fp32"
                )
                case_id = fold_cases(splits, str(fold), workspace.name)[1][0]
                tile = _checked_tile(workspace, plan, config, case_id)
            except (WorkspaceError, OSError, ValueError) as exc:
                log.warning("bf16 not checked (%s); predict --precision auto stays fp32 on CPUs", exc)
                return {"accepted": False, "reason": str(exc)}
            agreements.append(tile_agreement(ensemble, as_tensor(tile)))
    lowest = min(agreements)
    accepted = lowest >= BF16_AGREEMENT
    log.info(
        "bf16 %s for --precision auto on CPUs with native bf16: classes equal fp32's on %.3f%% of a tile's "
        "voxels at worst (%d folds; %.1f%% needed)",
        "accepted" if accepted else "refused",
        100 * lowest,
        len(agreements),
        100 * BF16_AGREEMENT,
    )
    return {"agreement": lowest, "tiles": len(agreements), "threshold": BF16_AGREEMENT, "accepted": accepted}


def _checked_tile(workspace: DatasetWorkspace, plan: Plan, config: Configuration, case_id: str) -> np.ndarray:
    """The central tile of the case's preprocessed image; a cascade stage's with the case's own label one-hot
    after it, standing in for the previous stage's mask (a good prediction of it)."""
    folder = workspace.preprocessed(config.data_identifier)
    image = np.load(folder / f"{case_id}.npy", mmap_mode="r")
    tile = central_tile(image, config.patch_size)
    if config.previous_stage is None:
        return tile
    labels = central_tile(np.load(folder / f"{case_id}_seg.npy", mmap_mode="r")[None], config.patch_size)[0]
    return np.concatenate([tile, one_hot(labels, plan.stage_labels)])


def central_tile(image: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """The patch-sized middle of a ``(C, *spatial)`` case (one slice of it for a 2D network)."""
    patch = (1,) * (image.ndim - 1 - len(patch)) + tuple(patch)
    return image[
        (slice(None), *(slice(max(0, (s - p) // 2), max(0, (s - p) // 2) + p) for s, p in zip(image.shape[1:], patch)))
    ]


def tile_agreement(ensemble: FoldEnsemble, tile: torch.Tensor) -> float:
    """Share of voxels whose class (label, or each region's inside/outside) is the same in fp32 and bf16."""
    classes = []
    for dtype in (None, torch.bfloat16):
        settings = dataclasses.replace(ensemble.window, mirror_axes=(), autocast_dtype=dtype)
        with torch.inference_mode():
            probabilities = predict_probabilities(
                ensemble.models, tile, ensemble.plan.num_classes, settings, bool(ensemble.plan.regions), ensemble.device
            )
        classes.append(probabilities > 0.5 if ensemble.plan.regions else probabilities.argmax(0))
    return float((classes[0] == classes[1]).float().mean())
