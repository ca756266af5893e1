"""Lesion-wise Dice and HD95 (BraTS 2023+) on constructed masks with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from autoseg.data.evaluation.lesions import MISSED_HD95_MM, LesionRule, lesion_wise

SHAPE = (40, 40, 40)


def cube(mask: np.ndarray, corner: tuple[int, int, int], size: int) -> np.ndarray:
    z, y, x = corner
    mask[z : z + size, y : y + size, x : x + size] = True
    return mask


def empty() -> np.ndarray:
    return np.zeros(SHAPE, bool)


def test_a_found_lesion_a_missed_lesion_and_a_false_positive():
    truth = cube(cube(empty(), (2, 2, 2), 4), (20, 20, 20), 4)  # two 64-voxel lesions far apart
    pred = cube(cube(empty(), (2, 2, 2), 4), (30, 2, 30), 4)  # the first exactly, and one elsewhere
    scores = lesion_wise(pred, truth, (1, 1, 1))
    assert scores["lesion_dice"] == pytest.approx((1 + 0 + 0) / 3)
    assert scores["lesion_hd95_mm"] == pytest.approx((0 + MISSED_HD95_MM + MISSED_HD95_MM) / 3)
    assert (scores["lesions_matched"], scores["lesions_missed"], scores["lesions_false_positive"]) == (1, 1, 1)


def test_fragments_closer_than_the_dilation_are_one_lesion():
    truth = cube(cube(empty(), (10, 10, 10), 4), (10, 10, 16), 4)  # a 2-voxel gap: one lesion at dilation 3
    pred = cube(empty(), (10, 10, 10), 4)  # finds one fragment
    merged = lesion_wise(pred, truth, (1, 1, 1))
    assert merged["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert (merged["lesions_matched"], merged["lesions_missed"], merged["lesions_false_positive"]) == (1, 0, 0)
    # without dilation the fragments are two lesions, and the second is missed
    split = lesion_wise(pred, truth, (1, 1, 1), LesionRule(dilation=0, min_volume_mm3=50))
    assert split["lesion_dice"] == pytest.approx((1 + 0) / 2)


def test_a_prediction_near_a_lesion_matches_it():
    truth = cube(empty(), (10, 10, 10), 4)
    pred = cube(empty(), (10, 10, 16), 4)  # no overlap, but inside the lesion's 3-voxel dilation
    scores = lesion_wise(pred, truth, (1, 1, 1))
    assert scores["lesion_dice"] == 0.0 and scores["lesions_false_positive"] == 0
    assert scores["lesions_matched"] == 1
    assert 0 < scores["lesion_hd95_mm"] < MISSED_HD95_MM


def test_small_lesions_are_left_out_and_the_volume_is_in_mm3():
    truth = cube(cube(empty(), (2, 2, 2), 4), (20, 20, 20), 3)  # 64 voxels found; 27 voxels missed
    pred = cube(empty(), (2, 2, 2), 4)
    assert lesion_wise(pred, truth, (1, 1, 1))["lesion_dice"] == pytest.approx(1.0)  # 27 mm3 <= 50: ignored
    coarse = lesion_wise(pred, truth, (2, 2, 2))  # 27 voxels of 8 mm3 = 216 mm3: counts, and is missed
    assert coarse["lesion_dice"] == pytest.approx(0.5) and coarse["lesions_missed"] == 1
    # a prediction that touches an ignored small lesion is not a false positive
    near_small = cube(pred.copy(), (20, 20, 20), 3)
    assert lesion_wise(near_small, truth, (1, 1, 1))["lesions_false_positive"] == 0


def test_empty_masks_score_one_and_zero():
    scores = lesion_wise(empty(), empty(), (1, 1, 1))
    assert (scores["lesion_dice"], scores["lesion_hd95_mm"]) == (1.0, 0.0)
    only_fp = lesion_wise(cube(empty(), (5, 5, 5), 2), empty(), (1, 1, 1))
    assert (only_fp["lesion_dice"], only_fp["lesion_hd95_mm"]) == (0.0, MISSED_HD95_MM)


def test_evaluate_lesion_wise_on_brats_files(run_cli, tmp_path):
    """`autoseg evaluate --lesion-wise` on BraTS-labelled NIfTI files: per region, in summary.json and metrics.csv."""
    import json

    import nibabel as nib

    def write(path, array_zyx):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)).astype(np.uint8), np.eye(4)), str(path)
        )

    truth = np.zeros(SHAPE, np.uint8)
    truth[2:8, 2:8, 2:8] = 2  # edema around
    truth[4:6, 4:6, 4:6] = 4  # a small enhancing core (8 voxels: below 50 mm3)
    truth[20:26, 20:26, 20:26] = 2  # a second tumour, missed entirely
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:8, 2:8, 2:8] = 2
    pred[30:34, 30:34, 30:34] = 2  # a false positive
    write(tmp_path / "t" / "BraTS-001.nii.gz", truth)
    write(tmp_path / "p" / "BraTS-001.nii.gz", pred)
    result = run_cli(
        "evaluate",
        "-p",
        tmp_path / "p",
        "-g",
        tmp_path / "t",
        "--labels",
        "brats",
        "--regions",
        "brats",
        "--lesion-wise",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    wt = summary["cases"]["BraTS-001"]["WT"]
    assert wt["lesion_dice"] == pytest.approx(1 / 3)  # found, missed, false positive
    assert (wt["lesions_matched"], wt["lesions_missed"], wt["lesions_false_positive"]) == (1, 1, 1)
    et = summary["cases"]["BraTS-001"]["ET"]
    assert (et["lesion_dice"], et["lesion_hd95_mm"]) == (1.0, 0.0)  # the only ET lesion is below 50 mm3
    assert summary["lesion_rule"] == {"dilation": 3, "min_volume_mm3": 50.0}
    header = (tmp_path / "p" / "metrics.csv").read_text().splitlines()[0]
    assert header.endswith("lesion_dice,lesion_hd95_mm,lesions_matched,lesions_missed,lesions_false_positive")
    assert "Lesion-wise (BraTS)" in result.output and "false positive" in result.output
