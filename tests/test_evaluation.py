"""`autoseg evaluate`: metrics with known answers, HD95/ASD against a brute-force KD-tree, empty-mask
conventions, BraTS labels and regions, folder errors and the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

from autoseg.core.errors import DatasetError
from autoseg.data.evaluation.evaluate import dice_per_class, evaluate_folders, mean_scores
from autoseg.data.evaluation.metrics import METRICS, dice, image_diagonal_mm, mask_metrics, surface_distances
from autoseg.phantoms import synthetic

SPACING = (2.0, 0.7, 0.9)  # (z, y, x) mm


def write_mask(path: Path, array_zyx: np.ndarray, spacing_zyx=SPACING, seed: int = 0) -> Path:
    """A real NIfTI file with an oblique affine; ``array_zyx`` is in autoseg's (z, y, x) order."""
    affine = synthetic.random_affine(spacing_zyx, np.random.default_rng(seed))
    image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)).astype(np.uint8), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def ball(shape, centre, radius_mm, spacing) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm**2


# --------------------------------------------------------------------------- independent reference


def brute_surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Surface voxels found by looking at the 6 face neighbours (outside the image is background), in mm."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    exposed = np.zeros_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            exposed |= ~np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & exposed) * np.asarray(spacing)


def brute_directed(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    pa, pb = brute_surface_points(a, spacing), brute_surface_points(b, spacing)
    return cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]


SHAPE = (20, 30, 28)
SURFACE_CASES = {
    "concentric spheres": (ball(SHAPE, (10, 15, 14), 9.0, SPACING), ball(SHAPE, (10, 15, 14), 6.0, SPACING)),
    "shifted boxes": (box(SHAPE, (4, 5, 6), (12, 20, 18)), box(SHAPE, (6, 8, 6), (15, 20, 25))),
    "touching the border": (box(SHAPE, (0, 0, 3), (8, 12, 28)), box(SHAPE, (2, 0, 0), (9, 15, 20))),
    "disjoint blobs": (
        ball(SHAPE, (5, 8, 8), 5.0, SPACING) | box(SHAPE, (14, 20, 20), (17, 26, 27)),
        ball(SHAPE, (6, 10, 9), 4.0, SPACING),
    ),
}


@pytest.mark.parametrize("name", SURFACE_CASES)
def test_surface_distances_match_a_brute_force_kd_tree(name):
    pred, truth = SURFACE_CASES[name]
    pred_to_truth, truth_to_pred = surface_distances(pred, truth, SPACING)
    ref_pt, ref_tp = brute_directed(pred, truth, SPACING)
    np.testing.assert_allclose(np.sort(pred_to_truth), np.sort(ref_pt), atol=1e-9)
    np.testing.assert_allclose(np.sort(truth_to_pred), np.sort(ref_tp), atol=1e-9)

    scores = mask_metrics(pred, truth, SPACING)
    expected_hd95 = max(np.percentile(ref_pt, 95), np.percentile(ref_tp, 95))
    assert scores["hd95_mm"] == pytest.approx(expected_hd95, abs=1e-9)
    assert scores["asd_mm"] == pytest.approx(np.concatenate([ref_pt, ref_tp]).mean(), abs=1e-9)
    # medpy pools both sets before the percentile; that is never larger than our definition
    assert np.percentile(np.concatenate([ref_pt, ref_tp]), 95) <= scores["hd95_mm"] + 1e-9


def test_concentric_spheres_are_about_the_radius_difference_apart():
    spacing = (1.0, 1.0, 1.0)
    outer, inner = ball((40, 40, 40), (20, 20, 20), 12.0, spacing), ball((40, 40, 40), (20, 20, 20), 8.0, spacing)
    scores = mask_metrics(inner, outer, spacing)
    assert scores["asd_mm"] == pytest.approx(4.0, abs=0.5)
    assert scores["hd95_mm"] == pytest.approx(4.0, abs=0.8)
    assert scores["precision"] == 1.0 and scores["recall"] < 0.35


def test_overlap_metrics_of_two_boxes():
    truth = box(SHAPE, (2, 2, 2), (6, 6, 6))  # 64 voxels
    pred = box(SHAPE, (4, 2, 2), (10, 6, 6))  # 96 voxels, 32 of them inside the truth
    scores = mask_metrics(pred, truth, SPACING)
    assert scores["dice"] == pytest.approx(64 / 160)
    assert scores["iou"] == pytest.approx(32 / 128)
    assert scores["precision"] == pytest.approx(32 / 96)
    assert scores["recall"] == pytest.approx(32 / 64)
    voxel_ml = 2.0 * 0.7 * 0.9 / 1000
    assert scores["true_volume_ml"] == pytest.approx(64 * voxel_ml)
    assert scores["pred_volume_ml"] == pytest.approx(96 * voxel_ml)
    assert tuple(scores) == METRICS


def test_single_voxels_three_slices_apart():
    pred, truth = box(SHAPE, (2, 5, 5), (3, 6, 6)), box(SHAPE, (5, 5, 5), (6, 6, 6))
    scores = mask_metrics(pred, truth, SPACING)
    assert scores["hd95_mm"] == pytest.approx(6.0) and scores["asd_mm"] == pytest.approx(6.0)
    assert scores["dice"] == scores["iou"] == scores["precision"] == scores["recall"] == 0.0
    assert mask_metrics(truth, truth, SPACING)["hd95_mm"] == 0.0


def test_empty_mask_conventions():
    shape = (155, 240, 240)
    empty, lesion = np.zeros(shape, bool), box(shape, (70, 100, 100), (80, 110, 110))
    both = mask_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert (both["dice"], both["iou"], both["precision"], both["recall"]) == (1.0, 1.0, 1.0, 1.0)
    assert both["hd95_mm"] == both["asd_mm"] == 0.0
    for pred, truth in ((empty, lesion), (lesion, empty)):
        one = mask_metrics(pred, truth, (1.0, 1.0, 1.0))
        assert (one["dice"], one["iou"], one["precision"], one["recall"]) == (0.0, 0.0, 0.0, 0.0)
        assert one["hd95_mm"] == one["asd_mm"] == pytest.approx(373.13, abs=0.005)
    assert image_diagonal_mm((10, 20, 30), SPACING) == pytest.approx(np.sqrt(20.0**2 + 14.0**2 + 27.0**2))


def test_dice_helpers_used_by_validation_are_unchanged():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    pred = truth.copy()
    pred[0] = 2
    assert dice(pred == 1, truth == 1) == pytest.approx(2 * 16 / 48)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    scores = dice_per_class(pred, truth, {"background": 0, "a": 1, "b": 2}, [("ab", (1, 2))])
    assert scores == {"a": pytest.approx(2 / 3), "b": 0.0, "ab": 1.0}
    assert mean_scores({"x": {"a": 1.0}, "y": {"a": 0.5, "b": 1.0}}) == {"a": 0.75, "b": 1.0}


# --------------------------------------------------------------------------- folders


@pytest.fixture
def folders(tmp_path):
    """Three cases: perfect, label 2 shifted, and label 2 missing from both truth and prediction."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    shape = (12, 16, 14)
    t1 = box(shape, (2, 2, 2), (6, 6, 6)).astype(np.uint8)
    t1[box(shape, (7, 8, 8), (10, 12, 12))] = 2
    p2 = t1.copy()
    p2[p2 == 2] = 0
    p2[box(shape, (8, 8, 8), (11, 12, 12))] = 2  # 2 of 3 slices overlap
    t3 = box(shape, (3, 3, 3), (5, 5, 5)).astype(np.uint8)
    for seed, (case, truth, pred) in enumerate((("c1", t1, t1), ("c2", t1, p2), ("c3", t3, t3))):
        write_mask(truth_dir / f"{case}.nii.gz", truth, seed=seed)
        write_mask(pred_dir / f"{case}.nii.gz", pred, seed=seed)
    (pred_dir / "summary.json").write_text("{}")  # files that are not masks are ignored
    (pred_dir / "c1.npz").write_bytes(b"")
    return pred_dir, truth_dir


def test_folder_summary_and_csv(folders, tmp_path):
    pred_dir, truth_dir = folders
    summary = evaluate_folders(predictions=pred_dir, truth=truth_dir, output=tmp_path / "out", show_progress=False)
    assert summary["num_cases"] == 3 and list(summary["classes"]) == ["1", "2"]
    cases = summary["cases"]
    assert cases["c1"]["1"]["dice"] == cases["c1"]["2"]["dice"] == 1.0
    assert cases["c2"]["2"]["dice"] == pytest.approx(2 / 3)
    assert cases["c2"]["2"]["hd95_mm"] == pytest.approx(2.0)  # one slice of 2 mm
    assert cases["c3"]["2"] == {m: (1.0 if m in ("dice", "iou", "precision", "recall") else 0.0) for m in METRICS}
    assert summary["mean"]["2"]["dice"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert summary["foreground_mean"]["dice"] == pytest.approx((1.0 + (1 + 2 / 3 + 1) / 3) / 2)

    text = (tmp_path / "out" / "summary.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").open()))
    assert len(rows) == 6 and rows[0].keys() == {"case", "class", *METRICS}
    assert float(rows[3]["dice"]) == pytest.approx(2 / 3, abs=1e-5)  # c2, label 2
    assert not (pred_dir / "metrics.csv").exists()


def test_one_empty_mask_gives_the_diagonal_of_the_image(tmp_path):
    shape = (10, 12, 14)
    truth = box(shape, (2, 2, 2), (5, 5, 5)).astype(np.uint8)
    write_mask(tmp_path / "t" / "a.nii.gz", truth)
    write_mask(tmp_path / "p" / "a.nii.gz", np.zeros(shape, np.uint8))
    for folder in ("t", "p"):  # a case with no foreground at all
        write_mask(tmp_path / folder / "b.nii.gz", np.zeros(shape, np.uint8))
    summary = evaluate_folders(predictions=tmp_path / "p", truth=tmp_path / "t", show_progress=False)
    assert list(summary["classes"]) == ["1"] and summary["cases"]["b"]["1"]["hd95_mm"] == 0.0
    scores = summary["cases"]["a"]["1"]
    assert scores["dice"] == 0.0 and scores["pred_volume_ml"] == 0.0
    assert scores["hd95_mm"] == pytest.approx(image_diagonal_mm(shape, SPACING), rel=1e-5)
    assert (tmp_path / "p" / "summary.json").exists() and (tmp_path / "p" / "metrics.csv").exists()


def test_brats_labels_and_regions(tmp_path):
    shape = (12, 14, 16)
    raw = np.zeros(shape, np.uint8)
    raw[box(shape, (1, 1, 1), (11, 13, 15))] = 2  # edema
    raw[box(shape, (3, 3, 3), (9, 11, 13))] = 1  # necrosis (NCR)
    raw[box(shape, (5, 5, 5), (7, 9, 11))] = 4  # enhancing (ET)
    pred = raw.copy()
    pred[pred == 4] = 3  # BraTS 2023 writes ET as 3
    pred[box(shape, (3, 3, 3), (9, 11, 13)) & (raw == 1)] = 2  # necrosis predicted as edema
    write_mask(tmp_path / "t" / "BraTS-001.nii.gz", raw)
    write_mask(tmp_path / "p" / "BraTS-001.nii.gz", pred)
    summary = evaluate_folders(
        predictions=tmp_path / "p", truth=tmp_path / "t", labels="brats", regions="brats", show_progress=False
    )
    assert list(summary["classes"]) == ["edema", "non-enhancing tumor core", "enhancing tumor", "WT", "TC", "ET"]
    assert summary["classes"]["TC"] == {"kind": "region", "values": [2, 3]}
    scores = summary["cases"]["BraTS-001"]
    n_et, n_ncr = int((raw == 4).sum()), int((raw == 1).sum())
    n_ed = int((raw == 2).sum())
    assert scores["WT"]["dice"] == 1.0 and scores["ET"]["dice"] == 1.0 and scores["enhancing tumor"]["dice"] == 1.0
    assert scores["TC"]["dice"] == pytest.approx(2 * n_et / (n_et + n_et + n_ncr))
    assert scores["non-enhancing tumor core"]["dice"] == 0.0
    assert scores["edema"]["dice"] == pytest.approx(2 * n_ed / (n_ed + n_ed + n_ncr))
    assert scores["edema"]["precision"] == pytest.approx(n_ed / (n_ed + n_ncr))

    with pytest.raises(DatasetError, match="BraTS-001.*--labels brats"):  # 1/2/4 files need --labels brats
        evaluate_folders(predictions=tmp_path / "p", truth=tmp_path / "t", regions="brats", show_progress=False)


def test_regions_from_an_nnunet_dataset_json(tmp_path):
    shape = (8, 10, 10)
    truth = box(shape, (1, 1, 1), (7, 9, 9)).astype(np.uint8)
    truth[box(shape, (3, 3, 3), (5, 5, 5))] = 2
    pred = (truth > 0).astype(np.uint8)  # the inner label is missed
    write_mask(tmp_path / "t" / "x.nii.gz", truth)
    write_mask(tmp_path / "p" / "x.nii.gz", pred)
    meta = {
        "labels": {"background": 0, "organ": [1, 2], "core": [2]},
        "regions_class_order": [1, 2],
        "channel_names": {"0": "CT"},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    summary = evaluate_folders(
        predictions=tmp_path / "p", truth=tmp_path / "t", dataset_json=tmp_path / "dataset.json", show_progress=False
    )
    assert list(summary["classes"]) == ["label 1", "label 2", "organ", "core"]
    assert summary["cases"]["x"]["organ"]["dice"] == 1.0 and summary["cases"]["x"]["core"]["dice"] == 0.0


def test_geometry_mismatch_names_every_case(folders):
    pred_dir, truth_dir = folders
    write_mask(pred_dir / "c1.nii.gz", np.zeros((12, 16, 14), np.uint8), spacing_zyx=(1.0, 0.7, 0.9), seed=0)
    write_mask(pred_dir / "c3.nii.gz", np.zeros((12, 16, 15), np.uint8), seed=2)
    with pytest.raises(DatasetError) as info:
        evaluate_folders(predictions=pred_dir, truth=truth_dir, show_progress=False)
    message = str(info.value)
    assert "case c1" in message and "spacing" in message
    assert "case c3" in message and "shape" in message and "case c2" not in message


def test_missing_predictions_are_all_reported(folders):
    pred_dir, truth_dir = folders
    (pred_dir / "c1.nii.gz").unlink()
    (pred_dir / "c3.nii.gz").unlink()
    with pytest.raises(DatasetError, match="(?s)Predictions are missing.*case c1.*case c3"):
        evaluate_folders(predictions=pred_dir, truth=truth_dir, show_progress=False)


# --------------------------------------------------------------------------- command line


def test_cli_writes_files_and_prints_the_table(run_cli, folders, tmp_path):
    pred_dir, truth_dir = folders
    result = run_cli("evaluate", "-p", pred_dir, "-g", truth_dir, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "Mean over 3 cases" in result.output and "HD95" in result.output
    header = (pred_dir / "metrics.csv").read_text().splitlines()[0]
    assert header == "case,class,dice,iou,precision,recall,hd95_mm,asd_mm,pred_volume_ml,true_volume_ml"
    assert json.loads((pred_dir / "summary.json").read_text())["version"] == 1


def test_cli_errors(run_cli, folders):
    pred_dir, truth_dir = folders
    assert run_cli("evaluate", "-p", pred_dir, "-g", truth_dir, "--labels", "msd").exit_code == 2
    assert run_cli("evaluate", "-p", pred_dir, "-g", truth_dir, "--regions", "kits").exit_code == 2
    (pred_dir / "c2.nii.gz").unlink()
    result = run_cli("evaluate", "-p", pred_dir, "-g", truth_dir, "--no-progress")
    assert result.exit_code == 1 and "Error:" in result.output and "case c2" in result.output
    assert not (pred_dir / "metrics.csv").exists()
    result = run_cli("evaluate", "-p", pred_dir, "-g", truth_dir, "-o", truth_dir / "c1.nii.gz", "--no-progress")
    assert result.exit_code == 1 and "is a file, not a folder" in result.output


def test_ignore_label_and_undeclared_values_with_a_dataset_json(tmp_path):
    shape = (8, 10, 10)
    truth = box(shape, (2, 2, 2), (6, 6, 6)).astype(np.uint8)
    truth[:, :, 8:] = 2  # unannotated strip
    pred = box(shape, (2, 2, 2), (6, 6, 10)).astype(np.uint8)  # runs into the strip: not a false positive
    write_mask(tmp_path / "t" / "x.nii.gz", truth)
    write_mask(tmp_path / "p" / "x.nii.gz", pred)
    meta = {
        "labels": {"background": 0, "organ": 1, "ignore": 2},
        "channel_names": {"0": "CT"},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    run = dict(
        predictions=tmp_path / "p", truth=tmp_path / "t", dataset_json=tmp_path / "dataset.json", show_progress=False
    )
    summary = evaluate_folders(**run)
    assert list(summary["classes"]) == ["organ"]
    assert summary["cases"]["x"]["organ"]["dice"] == pytest.approx(2 * 64 / (64 + 96))  # 128 - 32 ignored

    write_mask(tmp_path / "p" / "x.nii.gz", pred * 5)
    with pytest.raises(DatasetError, match=r"case x: the prediction holds value\(s\) \[5\]"):
        evaluate_folders(**run)


def test_dice_per_class_leaves_out_unannotated_voxels():
    from autoseg.data.evaluation.evaluate import dice_per_class

    truth = np.array([0, 1, 1, 3, 3])
    predicted = np.array([0, 1, 1, 1, 2])  # predictions inside the ignore region do not count
    scores = dice_per_class(predicted, truth, {"background": 0, "a": 1, "b": 2, "ignore": 3})
    assert scores == {"a": 1.0, "b": 1.0}
