"""Overlap, volume and surface-distance metrics of one predicted/true binary mask pair.

Every distance is in millimetres: the voxel spacing enters the distance transform. The
definitions (see docs/evaluation.md):

* **surface** of a mask: its voxels with at least one face neighbour (6-connectivity)
  outside the mask or outside the image, i.e. the mask minus its erosion;
* **directed surface distances** A -> B: for every surface voxel of A, the distance between
  voxel centres to the nearest surface voxel of B;
* **HD95**: the larger of the two directed 95th percentiles (NumPy's linear interpolation),
  ``max(P95(pred -> truth), P95(truth -> pred))``, as MONAI and the ``surface-distance``
  package used by BraTS 2023 (medpy's ``hd95`` pools both sets first, which can be smaller);
* **ASD**: the mean of both directed sets pooled (the average symmetric surface distance).

Empty masks (BraTS convention): both empty -> overlap metrics 1, distances 0; exactly one
empty -> overlap metrics 0, distances the diagonal of the image in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.core.geometry import voxel_volume_ml
from autoseg.data.preprocessing.cropping import bounding_box

#: Metric names in the order of ``metrics.csv`` columns.
METRICS = ("dice", "iou", "precision", "recall", "hd95_mm", "asd_mm", "pred_volume_ml", "true_volume_ml")
#: Percentile of the robust Hausdorff distance.
HD_PERCENTILE = 95.0


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm (373.13 for 240×240×155 voxels of 1 mm)."""
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    return float(np.sqrt(np.sum(extent**2)))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; both empty: 1 (nothing to find, nothing found)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    return dice_from_counts(
        int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    )


def dice_from_counts(overlap: int, n_pred: int, n_truth: int) -> float:
    """The one Dice formula of the package (evaluation, validation, selection, lesion-wise scores)."""
    return 2.0 * overlap / (n_pred + n_truth) if n_pred + n_truth else 1.0


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it; the image border counts as outside."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(a -> b, b -> a)``, one value per surface voxel.

    Both masks must be non-empty. The work happens in the bounding box of their union, which
    makes a small lesion in a 240×240×155 volume cost milliseconds.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    # one voxel of margin keeps each surface voxel's outside neighbour in the box: surfaces and distances
    # computed there equal those of the full image
    box = bounding_box(a | b, margin=1)
    if box is None or not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    surface_a, surface_b = surface(a[box]), surface(b[box])
    sampling = tuple(float(s) for s in spacing)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)
    return to_b[surface_a], to_a[surface_b]


def hd95(pred_to_truth: np.ndarray, truth_to_pred: np.ndarray) -> float:
    """Robust Hausdorff distance: the larger of the two directed 95th percentiles."""
    return float(max(np.percentile(pred_to_truth, HD_PERCENTILE), np.percentile(truth_to_pred, HD_PERCENTILE)))


def average_surface_distance(pred_to_truth: np.ndarray, truth_to_pred: np.ndarray) -> float:
    """Mean of both directed distance sets pooled (ASSD)."""
    return float((pred_to_truth.sum() + truth_to_pred.sum()) / (pred_to_truth.size + truth_to_pred.size))


def mask_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], *, diagonal_mm: float | None = None
) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one binary mask pair.

    ``diagonal_mm`` is the distance given when exactly one mask is empty; it defaults to the
    diagonal of the masks' own shape, so pass the full image's when the masks are cropped.
    """
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    voxel_ml = voxel_volume_ml(spacing)
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    volumes = {"pred_volume_ml": n_pred * voxel_ml, "true_volume_ml": n_truth * voxel_ml}
    if n_pred == 0 and n_truth == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95_mm": 0.0, "asd_mm": 0.0} | volumes
    if n_pred == 0 or n_truth == 0:
        far = image_diagonal_mm(pred.shape, spacing) if diagonal_mm is None else float(diagonal_mm)
        return {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "hd95_mm": far, "asd_mm": far} | volumes
    overlap = int(np.count_nonzero(pred & truth))
    pred_to_truth, truth_to_pred = surface_distances(pred, truth, spacing)
    return {
        "dice": dice_from_counts(overlap, n_pred, n_truth),
        "iou": overlap / (n_pred + n_truth - overlap),
        "precision": overlap / n_pred,
        "recall": overlap / n_truth,
        "hd95_mm": hd95(pred_to_truth, truth_to_pred),
        "asd_mm": average_surface_distance(pred_to_truth, truth_to_pred),
    } | volumes
