"""May bf16, or OpenVINO, stand in for torch fp32 for the chosen model? ``select`` checks each once per model.

bf16 convolutions run about twice as fast as fp32 on CPUs that have them natively (AVX512-BF16,
AMX), and OpenVINO runs the same network about 1.5× faster than torch in fp32 (docs/performance.md);
both usually change no class. "Usually" is not enough for a default, so ``select`` predicts one
validation case's central tile of every chosen fold in torch fp32 and in the stand-in (torch bf16;
OpenVINO fp32, the fold exported to ONNX in memory as ``--backend openvino`` does) and records how
often the classes agree. ``predict --precision auto`` takes bf16 on such a CPU only for a model whose
bf16 check passed, and ``predict``'s default ``--backend auto`` takes OpenVINO on a CPU only for a
model whose OpenVINO check passed (:func:`autoseg.inference.choice.load_predictor`). A model-level
check, rather than one on the case being predicted, keeps a case's mask independent of which other
cases are predicted with it and in which order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

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
#: the same rule for OpenVINO fp32 against torch fp32
OPENVINO_AGREEMENT = 0.999
#: (configuration, fold, the fold's torch fp32 ensemble, its tile) -> the share of voxels whose class is unchanged
Agreement = Callable[[str, str, FoldEnsemble, torch.Tensor], float]


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
    try:
        lowest, tiles = _lowest_agreement(
            workspace, plan, folds, splits, checkpoint, lambda _c, _f, ensemble, tile: tile_agreement(ensemble, tile)
        )
    except (WorkspaceError, OSError, ValueError) as exc:
        log.warning("bf16 not checked (%s); predict --precision auto stays fp32 on CPUs", exc)
        return {"accepted": False, "reason": str(exc)}
    return _verdict("bf16", "--precision auto on CPUs with native bf16", lowest, tiles, BF16_AGREEMENT)


def openvino_check(
    workspace: DatasetWorkspace,
    plan: Plan,
    folds: dict[str, Sequence[str]],
    splits: list[dict],
    checkpoint: str = "final",
) -> dict:
    """``inference.json``'s ``openvino`` entry: the lowest agreement of OpenVINO fp32 with torch fp32 over the
    chosen folds, and the verdict.

    Whatever stops the check (openvino or the onnx extra not installed, an export or a compile that fails, a
    fold's weights or validation case deleted) refuses OpenVINO with the reason: ``predict`` stays on torch.
    """

    def agreement(configuration: str, fold: str, reference: FoldEnsemble, tile: torch.Tensor) -> float:
        openvino = load_fold_ensemble(
            workspace,
            plan,
            configuration,
            [fold],
            checkpoint,
            device="cpu",
            tta=False,
            precision="fp32",
            backend="openvino",
        )
        return class_agreement(tile_classes(reference, tile), tile_classes(openvino, tile))

    try:
        lowest, tiles = _lowest_agreement(workspace, plan, folds, splits, checkpoint, agreement)
    except Exception as exc:  # any failure: OpenVINO is a speed-up, its check never fails `select`
        log.warning("openvino not checked (%s); predict --backend auto stays torch", exc)
        return {"accepted": False, "reason": str(exc) or type(exc).__name__}
    return _verdict("openvino", "--backend auto on CPUs", lowest, tiles, OPENVINO_AGREEMENT)


def _lowest_agreement(
    workspace: DatasetWorkspace,
    plan: Plan,
    folds: dict[str, Sequence[str]],
    splits: list[dict],
    checkpoint: str,
    agreement: Agreement,
) -> tuple[float, int]:
    """The lowest ``agreement`` over the chosen folds' central tiles (of a validation case each), and the count."""
    agreements = []
    for configuration in list(folds):
        previous = plan.configuration(configuration).previous_stage
        if previous is not None and previous not in folds:
            folds = {**folds, previous: folds[configuration]}
    for configuration, names in folds.items():
        config = plan.configuration(configuration)
        for fold in names:
            reference = load_fold_ensemble(
                workspace, plan, configuration, [fold], checkpoint, device="cpu", tta=False, precision="fp32"
            )
            case_id = fold_cases(splits, str(fold), workspace.name)[1][0]
            tile = as_tensor(np.array(_checked_tile(workspace, plan, config, case_id)))  # a writable copy
            agreements.append(agreement(configuration, str(fold), reference, tile))
    return min(agreements), len(agreements)


def _verdict(name: str, use: str, lowest: float, tiles: int, threshold: float) -> dict:
    accepted = lowest >= threshold
    log.info(
        "%s %s for %s: classes equal torch fp32's on %.3f%% of a tile's voxels at worst (%d folds; %.1f%% needed)",
        name,
        "accepted" if accepted else "refused",
        use,
        100 * lowest,
        tiles,
        100 * threshold,
    )
    return {"agreement": lowest, "tiles": tiles, "threshold": threshold, "accepted": accepted}


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
    return class_agreement(tile_classes(ensemble, tile), tile_classes(ensemble, tile, torch.bfloat16))


def tile_classes(ensemble: FoldEnsemble, tile: torch.Tensor, autocast: torch.dtype | None = None) -> torch.Tensor:
    """The classes (label, or each region's inside/outside) of one tile without mirroring, torch's network under
    ``autocast`` (None: fp32; other backends run as they were compiled)."""
    settings = dataclasses.replace(ensemble.window, mirror_axes=(), autocast_dtype=autocast)
    with torch.inference_mode():
        probabilities = predict_probabilities(
            ensemble.models, tile, ensemble.plan.num_classes, settings, bool(ensemble.plan.regions), ensemble.device
        )
    return probabilities > 0.5 if ensemble.plan.regions else probabilities.argmax(0)


def class_agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of voxels (and regions) whose class is the same."""
    return float((first == second).float().mean())
