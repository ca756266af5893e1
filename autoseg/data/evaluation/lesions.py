"""Lesion-wise Dice and HD95, the ranking metrics of the BraTS challenges since 2023.

The definition follows the BraTS 2023 lesion-wise evaluation (docs/evaluation.md has it in
words):

1. Truth lesions are the 26-connected components of the truth mask, where components whose
   dilations (``dilation`` iterations of the 18-neighbour cross, 3 for BraTS-GLI) touch are
   one lesion: nearby fragments of one tumour are not scored as several lesions.
2. A predicted component (26-connected) *matches* a truth lesion when it overlaps that
   lesion's dilation. Each truth lesion is scored against the union of its matches: Dice,
   and HD95 in mm (374 mm when nothing matches).
3. Predicted components that match no truth lesion are false positives: Dice 0, HD95 374.
4. Truth lesions of at most ``min_volume_mm3`` (50 mm³ for BraTS-GLI) are left out of the
   scores, missed or not; a prediction that matches one is not a false positive either.
5. The case's score is the mean over the kept truth lesions and the false positives; with
   neither (both masks empty), Dice 1 and HD95 0.

HD95 of a matched lesion uses :func:`autoseg.data.evaluation.metrics.hd95` on voxel surfaces (as ``autoseg
evaluate``'s HD95); BraTS's scorer uses the surfel-weighted ``surface-distance`` package,
which can differ by a fraction of a voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from autoseg.data.evaluation.metrics import dice, hd95, surface_distances
from autoseg.data.preprocessing.cropping import grow_box

#: Metric names added to each class by ``autoseg evaluate --lesion-wise``.
LESION_METRICS = ("lesion_dice", "lesion_hd95_mm", "lesions_matched", "lesions_missed", "lesions_false_positive")
#: HD95 given to a missed lesion or a false positive (BraTS's constant, mm).
MISSED_HD95_MM = 374.0
COMPONENTS = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
DILATION = ndimage.generate_binary_structure(3, 2)  # the 18-neighbour cross BraTS dilates with


@dataclass(frozen=True)
class LesionRule:
    """The two numbers each BraTS sub-challenge sets (defaults: BraTS-GLI, glioma)."""

    dilation: int = 3
    min_volume_mm3: float = 50.0


def truth_lesions(truth: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """Truth components, merged where their dilations touch: a label map 1..n on the truth voxels."""
    if dilation == 0:
        return ndimage.label(truth, structure=COMPONENTS)
    grown, count = ndimage.label(ndimage.binary_dilation(truth, DILATION, iterations=dilation), structure=COMPONENTS)
    return np.where(truth, grown, 0), count


def lesion_wise(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], rule: LesionRule = LesionRule()
) -> dict[str, float]:
    """Lesion-wise Dice and HD95 of one binary mask pair, with the lesion counts behind them."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.ndim != 3 or pred.shape != truth.shape:
        raise ValueError(f"lesion-wise metrics need two 3D masks of one shape, got {pred.shape} and {truth.shape}")
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    lesions, n_lesions = truth_lesions(truth, rule.dilation)
    components, _ = ndimage.label(pred, structure=COMPONENTS)
    matched: set[int] = set()
    dice_kept, hd_kept, missed = [], [], 0
    for index, box in enumerate(ndimage.find_objects(lesions), start=1):
        box = grow_box(box, rule.dilation, truth.shape)
        lesion = lesions[box] == index
        reach = ndimage.binary_dilation(lesion, DILATION, iterations=rule.dilation) if rule.dilation else lesion
        hits = set(np.unique(components[box][reach]).tolist()) - {0}
        matched |= hits
        if lesion.sum() * voxel_mm3 <= rule.min_volume_mm3:
            continue
        lesion_score, hd = _score_lesion(lesions == index, np.isin(components, list(hits)), spacing)
        dice_kept.append(lesion_score)
        hd_kept.append(hd)
        missed += not hits
    false_positives = int(components.max()) - len(matched)
    scored = len(dice_kept) + false_positives
    return {
        "lesion_dice": float(sum(dice_kept) / scored) if scored else 1.0,
        "lesion_hd95_mm": float((sum(hd_kept) + false_positives * MISSED_HD95_MM) / scored) if scored else 0.0,
        "lesions_matched": float(len(dice_kept) - missed),
        "lesions_missed": float(missed),
        "lesions_false_positive": float(false_positives),
    }


def _score_lesion(lesion: np.ndarray, matches: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    if not matches.any():
        return 0.0, MISSED_HD95_MM
    return dice(matches, lesion), hd95(*surface_distances(matches, lesion, spacing))
