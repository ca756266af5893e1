"""Quality control of predictions: each flag raised by a case built to deserve it, none for normal
held-out phantoms. The pure functions run on arrays against a real fingerprint of phantom files
(fast); one end-to-end `predict` run (slow) checks report.json, --statistics and the console."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from autoseg.core.geometry import Geometry
from autoseg.data.io.datasets import discover_dataset
from autoseg.data.preprocessing.fingerprint import body_quantiles, compute_fingerprint, load_fingerprint
from autoseg.data.qc.flags import (
    assess_case,
    confidence_flags,
    flag_summary,
    structure_statistics,
    structure_volumes,
    training_reference,
)
from autoseg.phantoms import synthetic

SHAPE = (32, 40, 36)  # the phantom size of conftest's `trained` model
CHANNELS = ("FLAIR", "T1w", "T1gd", "T2w")
#: the phantom's structures: name -> (probability channel, consecutive labels), as structures_of(plan) gives
STRUCTURES = {"edema": (1, (1,)), "non-enhancing tumour": (2, (2,)), "enhancing tumour": (3, (3,))}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory) -> dict:
    """The fingerprint of eight phantom brains written as MSD files, as `autoseg plan` computes it."""
    root = synthetic.write_msd_brain(tmp_path_factory.mktemp("qc") / "Task01_BrainTumour", 8, shape=SHAPE)
    return compute_fingerprint(discover_dataset(root), show_progress=False)


@pytest.fixture(scope="module")
def reference(fingerprint):
    return training_reference(fingerprint, STRUCTURES)


def held_out_cases(n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Phantoms the reference never saw (another seed), with their true labels; all have every structure."""
    rng = np.random.default_rng(123)
    return [synthetic.brain_case(SHAPE, rng) for _ in range(n)]


def geometry(spacing=(1.0, 1.0, 1.0), shape=SHAPE) -> Geometry:
    return Geometry(tuple(shape), tuple(spacing), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def assess(image: np.ndarray, labels: np.ndarray, reference, spacing=(1.0, 1.0, 1.0), confidence=None) -> dict:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return assess_case(
        geometry(spacing, labels.shape),
        body_quantiles(image, "case"),
        CHANNELS,
        structure_volumes(labels, STRUCTURES, voxel_ml),
        confidence,
        reference,
    )


def names(entry: dict) -> list[str]:
    return [f["flag"] for f in entry["flags"]]


def test_the_fingerprint_records_each_cases_body_intensities(fingerprint):
    for record in fingerprint["cases"].values():
        quantiles = np.array(record["body_intensities"])
        assert quantiles.shape == (4, 9) and np.all(np.diff(quantiles, axis=1) >= 0)
        assert quantiles[:, 0].min() > 0  # the body: the zero background is left out
    assert fingerprint["version"] == 2


def test_normal_held_out_cases_raise_no_flag(reference):
    for image, labels in held_out_cases():
        entry = assess(image, labels, reference)
        assert entry["flags"] == [], entry["flags"]
        assert entry["input"] == {
            "shape": list(SHAPE),
            "spacing": [1.0, 1.0, 1.0],
            "orientation": "LPS",
            "field_of_view_mm": [32.0, 40.0, 36.0],
        }
        flair = entry["intensities"]["FLAIR"]
        assert flair["training"]["median"][0] <= flair["median"] <= flair["training"]["median"][1] * 1.5
        assert flair["profile_distance"] < flair["profile_limit"]
        edema = entry["volumes"]["edema"]
        assert edema["volume_ml"] == pytest.approx(np.count_nonzero(labels == 1) / 1000)
        assert edema["training_cases_with_it"] == "8/8"
        assert entry["volumes"]["enhancing tumour"]["training_cases_with_it"] == "6/8"  # every 4th has none


@pytest.mark.parametrize(
    "order, moved",
    [
        ((3, 1, 2, 0), "FLAIR looks like T2w, T2w looks like FLAIR"),
        ((1, 0, 2, 3), "FLAIR looks like T1w, T1w looks like FLAIR"),
    ],
)
def test_swapped_channels_are_flagged_as_swapped_not_as_foreign(reference, order, moved):
    for image, labels in held_out_cases():
        entry = assess(image[list(order)], labels, reference)
        assert entry["flags"] == [{"flag": "swapped_channels", "reason": moved}]


def test_mri_units_do_not_matter_but_cts_do(fingerprint, reference):
    """MRI channels are normalised per case (z-score): any scale and offset is a normal scanner difference.
    CT is in Hounsfield units: a tenfold scale (CT stored without its rescale) is flagged."""
    image, labels = held_out_cases(1)[0]
    body = np.any(image != 0, axis=0)
    shifted = image.copy()
    shifted[:, body] += 250.0  # an offset inside the body
    for changed in (image * 10, image * 0.01, shifted):
        assert names(assess(changed, labels, reference)) == []
    scaled = image.copy()
    scaled[1] *= 10  # one channel in another unit
    assert names(assess(scaled, labels, reference)) == []
    as_ct = training_reference(fingerprint, STRUCTURES, ["ct"] * 4)  # the same channels read as absolute units
    assert names(assess(image, labels, as_ct)) == []
    entry = assess(scaled, labels, as_ct)
    assert names(entry) == ["intensity_range"] and entry["flags"][0]["reason"].startswith("T1w ")


def test_three_mm_spacing_for_a_one_mm_model_is_flagged(reference):
    image, labels = held_out_cases(1)[0]
    entry = assess(image, labels, reference, spacing=(3.0, 1.0, 1.0))
    assert names(entry)[:2] == ["spacing", "field_of_view"]
    assert "3 x 1 x 1 mm; training 1 x 1 x 1 to 1 x 1 x 1 mm" == entry["flags"][0]["reason"]
    assert entry["input"]["field_of_view_mm"] == [96.0, 40.0, 36.0]


def test_noise_and_a_ct_body_are_not_brains(reference):
    image, labels = held_out_cases(1)[0]
    noise = np.random.default_rng(0).uniform(1, 1000, image.shape).astype(np.float32)
    entry = assess(noise, np.zeros(SHAPE, np.uint8), reference)
    assert "intensity_profile" in names(entry) and "swapped_channels" not in names(entry)
    assert "FLAIR" in next(f["reason"] for f in entry["flags"] if f["flag"] == "intensity_profile")
    ct, _ = synthetic.ct_case(SHAPE, np.random.default_rng(1))
    entry = assess(np.repeat(ct, 4, axis=0), labels, reference)  # a CT volume given to an MRI model
    assert names(entry)[:1] == ["intensity_profile"] and "swapped_channels" not in names(entry)


def test_heavy_noise_on_a_brain_is_flagged(reference):
    rng = np.random.default_rng(2)
    for image, labels in held_out_cases():
        body = np.any(image != 0, axis=0)
        noisy = image + rng.normal(0, image[:, body].std(), image.shape).astype(np.float32)  # SNR about 1
        assert "intensity_profile" in names(assess(noisy, labels, reference))


def test_the_wrong_body_part_in_mri_units_is_flagged(reference):
    """An abdomen (the CT phantom's anatomy, in arbitrary positive units as MRI has) for a brain model."""
    abdomen, labels = synthetic.ct_case(SHAPE, np.random.default_rng(3))
    mri_like = np.where(abdomen > -1000, abdomen + 1100.0, 0.0).astype(np.float32)
    rng = np.random.default_rng(4)
    image = np.concatenate([mri_like * rng.uniform(0.5, 2.0) for _ in CHANNELS])
    assert "intensity_profile" in names(assess(image, np.zeros(SHAPE, np.uint8), reference))


@pytest.fixture(scope="module")
def scanner_scaled(tmp_path_factory) -> tuple:
    """Eight phantom brains whose every channel is scaled by its own factor per case (0.05 to 50), as MRI
    scanners do, fingerprinted as `autoseg plan` does; and held-out cases scaled the same way."""
    root = synthetic.write_msd_brain(tmp_path_factory.mktemp("qcscaled") / "Task01_BrainTumour", 8, shape=SHAPE)
    rng = np.random.default_rng(7)
    for path in sorted((root / "imagesTr").glob("*.nii.gz")):
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32) * 10 ** rng.uniform(-1.3, 1.7, size=4)
        nib.save(nib.Nifti1Image(data, image.affine), path)
    reference = training_reference(compute_fingerprint(discover_dataset(root), show_progress=False), STRUCTURES)
    held = [(image * 10 ** rng.uniform(-1.3, 1.7, size=(4, 1, 1, 1)), labels) for image, labels in held_out_cases()]
    return reference, held


def test_scanner_scaling_raises_no_flag_and_a_swap_is_still_found(scanner_scaled):
    reference, held = scanner_scaled
    for image, labels in held:
        assert names(assess(image.astype(np.float32), labels, reference)) == []
        swapped = assess(image[[2, 1, 0, 3]].astype(np.float32), labels, reference)  # FLAIR and T1gd swapped
        assert swapped["flags"] == [
            {"flag": "swapped_channels", "reason": "FLAIR looks like T1gd, T1gd looks like FLAIR"}
        ]


def test_an_empty_prediction_is_flagged_only_for_structures_every_training_case_has(reference):
    image, labels = held_out_cases(1)[0]
    entry = assess(image, np.zeros_like(labels), reference)
    assert entry["flags"] == [
        {"flag": "empty_structure", "reason": "edema, non-enhancing tumour predicted empty; every training case has it"}
    ]


def test_a_volume_outside_the_training_range_is_flagged(reference):
    image, labels = held_out_cases(1)[0]
    swollen = labels.copy()
    swollen[ndimage.binary_dilation(labels > 0, iterations=6) & (labels == 0)] = 1  # edema over the whole head
    entry = assess(image, swollen, reference)
    assert names(entry) == ["volume"] and entry["flags"][0]["reason"].startswith("edema ")
    speck = np.zeros_like(labels)
    speck[10, 10, 10:12] = 3  # two voxels of enhancing tumour
    speck[labels == 1] = 1
    speck[labels == 2] = 2
    assert names(assess(image, speck, reference)) == ["volume"]


def test_low_confidence_and_fold_disagreement_need_a_non_empty_structure():
    sure = {"volume_ml": 2.0, "estimated_dice": 0.9, "mean_disagreement": 0.01}
    assert confidence_flags({"edema": sure}) == []
    flags = confidence_flags(
        {
            "edema": sure | {"estimated_dice": 0.3, "mean_disagreement": 0.4},
            "enhancing tumour": {"volume_ml": 0.0, "estimated_dice": 0.0, "mean_disagreement": None},
        }
    )
    assert flags == [
        {"flag": "low_estimated_dice", "reason": "estimated Dice edema 0.30 (under 0.5)"},
        {"flag": "fold_disagreement", "reason": "mean fold disagreement edema 0.40 (over 0.2)"},
    ]


def test_a_version_1_fingerprint_gives_geometry_and_volume_flags_only():
    old = load_fingerprint(ROOT / "plans" / "Task01_BrainTumour" / "fingerprint.json")  # version 1, still read
    assert old["version"] == 1
    reference = training_reference(old, STRUCTURES)
    assert reference.channels is None
    image, labels = held_out_cases(1)[0]
    entry = assess(image[[3, 1, 2, 0]], labels, reference)
    assert "training" not in entry["intensities"]["FLAIR"] and "swapped_channels" not in names(entry)


def test_statistics_count_volume_and_mean_intensity_per_structure():
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 0, :2] = 1
    labels[1, 2, 3] = 2
    image = np.stack([np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.full((2, 3, 4), 7, np.float32)])
    stats = structure_statistics(
        labels, image, ("A", "B"), {"one": (1, (1,)), "both": (0, (1, 2)), "none": (3, (3,))}, voxel_ml=0.008
    )
    assert stats["one"] == {"voxels": 2, "volume_ml": 0.016, "mean_intensity": {"A": 0.5, "B": 7.0}}
    assert stats["both"]["voxels"] == 3 and stats["both"]["mean_intensity"]["A"] == pytest.approx((0 + 1 + 23) / 3)
    assert stats["none"] == {"voxels": 0, "volume_ml": 0.0, "mean_intensity": {"A": None, "B": None}}


def test_the_console_line_of_a_case():
    assert (
        flag_summary(
            "case_003", [{"flag": "swapped_channels", "reason": ""}, {"flag": "intensity_range", "reason": ""}]
        )
        == "case_003: 2 flags (swapped_channels, intensity_range)"
    )
    assert flag_summary("case_001", []) == "case_001: no flags"


def _write_variant(source: Path, target: Path, change) -> None:
    image = nib.load(source)
    data = np.asarray(image.dataobj, dtype=np.float32)  # (x, y, z, channel)
    nib.save(nib.Nifti1Image(change(data), image.affine, image.header), target)


@pytest.mark.slow
def test_predict_reports_flags_volumes_and_statistics_and_a_rerun_keeps_them(trained, held_out, tmp_path, run_cli):
    """Normal held-out cases raise no flag, nor does the same scan scaled tenfold (MRI units are arbitrary);
    the same scan with two channels swapped does, on the console and in report.json, which --statistics and
    --uncertainty fill in too."""
    source = tmp_path / "scans"
    shutil.copytree(held_out / "imagesTr", source)
    _write_variant(source / "BRATS_001.nii.gz", source / "SWAPPED.nii.gz", lambda d: d[..., [3, 1, 2, 0]])
    _write_variant(source / "BRATS_002.nii.gz", source / "SCALED.nii.gz", lambda d: d * 10)
    out = tmp_path / "out"
    args = ("predict", "-w", trained, "-i", source, "-o", out, "--no-tta", "--device", "cpu", "--no-progress")
    result = run_cli(*args, "--uncertainty", "--statistics")
    assert result.exit_code == 0, result.output
    for line in (
        "BRATS_001: no flags",
        "BRATS_002: no flags",
        "BRATS_003: no flags",
        "SCALED: no flags",
        "1 of 5 case(s) flagged",
    ):
        assert line in result.output, result.output
    swapped = next(line for line in result.output.splitlines() if "SWAPPED:" in line)
    assert "swapped_channels" in swapped, result.output  # the folds may also disagree on it: fold_disagreement
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == 2 and report["reference"] == {"cases": 8, "intensities": True}
    assert report["thresholds"]["volume_factor"] == 2.0
    case = report["cases"]["BRATS_001"]
    assert case["input"]["shape"] == [32, 40, 36] and case["seconds"] > 0
    mask = np.asarray(nib.load(out / "BRATS_001.nii.gz").dataobj)
    edema = case["statistics"]["edema"]
    assert edema["voxels"] == np.count_nonzero(mask == 1) and case["volumes"]["edema"]["volume_ml"] > 0
    flair = np.asarray(nib.load(source / "BRATS_001.nii.gz").dataobj)[..., 0]
    assert edema["mean_intensity"]["FLAIR"] == pytest.approx(float(flair[mask == 1].mean()), rel=1e-4)
    assert 0 <= case["structures"]["edema"]["mean_disagreement"] <= 1
    assert report["cases"]["SWAPPED"]["flags"][0]["reason"] == "FLAIR looks like T2w, T2w looks like FLAIR"

    rerun = run_cli(*args)  # every mask exists: all skipped, their entries kept
    assert rerun.exit_code == 0 and "0 written, 5 skipped" in rerun.output and "flagged" not in rerun.output
    assert json.loads((out / "report.json").read_text())["cases"] == report["cases"]
