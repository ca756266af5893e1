"""The phantoms behave like the data they stand for: layout, anatomy, contrasts, determinism."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from autoseg.core.files import read_json
from autoseg.data.io.datasets import discover_dataset
from autoseg.phantoms import synthetic

SHAPE = (28, 32, 28)


def cases(n: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [synthetic.brain_case(SHAPE, rng, enhancing=(i % 4 != 3)) for i in range(n)]


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = synthetic.write_msd_brain(tmp_path / "a", 3, shape=SHAPE, seed=5, n_test=1)
    b = synthetic.write_msd_brain(tmp_path / "b", 3, shape=SHAPE, seed=5, n_test=1)
    c = synthetic.write_msd_brain(tmp_path / "c", 3, shape=SHAPE, seed=6, n_test=1)
    for relative in ("imagesTr/BRATS_002.nii.gz", "labelsTr/BRATS_003.nii.gz", "imagesTs/BRATS_004.nii.gz"):
        first, second, other = (nib.load(root / relative) for root in (a, b, c))
        np.testing.assert_array_equal(first.get_fdata(), second.get_fdata())
        np.testing.assert_array_equal(first.affine, second.affine)
        assert not np.array_equal(first.get_fdata(), other.get_fdata())


def test_msd_layout_with_held_out_cases(tmp_path):
    root = synthetic.write_msd_brain(tmp_path / "Task01", 3, shape=SHAPE, n_test=2)
    meta = read_json(root / "dataset.json")
    assert meta["numTraining"] == 3 and meta["test"] == ["./imagesTs/BRATS_004.nii.gz", "./imagesTs/BRATS_005.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTs").iterdir()) == ["BRATS_004.nii.gz", "BRATS_005.nii.gz"]
    spec = discover_dataset(root)
    assert [c.case_id for c in spec.cases] == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert spec.channel_names == ("FLAIR", "T1w", "T1gd", "T2w")
    image = nib.load(root / "imagesTs" / "BRATS_004.nii.gz")
    assert image.shape == (*reversed(SHAPE), 4)
    assert not np.allclose(image.affine[:3, :3], np.diag(np.diag(image.affine[:3, :3])))  # oblique
    alone = synthetic.write_msd_brain(tmp_path / "alone", 3, shape=SHAPE)  # test cases do not change training cases
    np.testing.assert_array_equal(
        nib.load(alone / "labelsTr/BRATS_002.nii.gz").get_fdata(),
        nib.load(root / "labelsTr/BRATS_002.nii.gz").get_fdata(),
    )


def test_nnunet_layout_with_another_protocol_and_merged_labels(tmp_path):
    """A second task for fine-tuning: a subset of the sequences in another order, other classes, held-out cases."""
    full = synthetic.write_nnunet_brain(tmp_path / "Dataset001_Full", 2, shape=SHAPE, seed=3, n_test=1)
    other = synthetic.write_nnunet_brain(
        tmp_path / "Dataset002_Other",
        2,
        shape=SHAPE,
        seed=3,
        n_test=1,
        channels=("T2w", "FLAIR", "T1gd"),
        labels={"edema": [1], "tumour core": [2, 3]},
    )
    meta = read_json(other / "dataset.json")
    assert meta["channel_names"] == {"0": "T2w", "1": "FLAIR", "2": "T1gd"}
    assert meta["labels"] == {"background": 0, "edema": 1, "tumour core": 2} and meta["numTraining"] == 2
    spec = discover_dataset(other)
    assert [c.case_id for c in spec.cases] == ["BRATS_001", "BRATS_002"]
    for written, phantom in ((0, 3), (1, 0), (2, 2)):  # T2w is the phantom's 4th channel, FLAIR its 1st
        np.testing.assert_array_equal(
            nib.load(other / "imagesTs" / f"BRATS_003_{written:04d}.nii.gz").get_fdata(),
            nib.load(full / "imagesTs" / f"BRATS_003_{phantom:04d}.nii.gz").get_fdata(),
        )
    truth = nib.load(full / "labelsTr" / "BRATS_001.nii.gz").get_fdata()
    merged = nib.load(other / "labelsTr" / "BRATS_001.nii.gz").get_fdata()
    assert {1, 2, 3} <= set(np.unique(truth))
    np.testing.assert_array_equal(merged, np.array([0, 1, 2, 2])[truth.astype(int)])
    assert sorted(p.name for p in (other / "labelsTs").iterdir()) == ["BRATS_003.nii.gz"]


def test_tumour_compartments_are_nested_and_some_cases_lack_enhancement():
    for i, (image, label) in enumerate(cases()):
        head = image[0] > 0
        assert np.all(label[~head] == 0), "tumour outside the head"
        assert np.all(image[:, ~head] == 0), "skull-stripped: zero background"
        assert (label == 1).any() and (label == 2).any()
        assert (label == 3).any() == (i % 4 != 3)
        centre = np.argwhere(label > 0).mean(axis=0)
        distance = {
            v: np.linalg.norm(np.argwhere(label == v) - centre, axis=1).mean() for v in (1, 2, 3) if (label == v).any()
        }
        assert distance[2] < distance[1]  # core inside edema
        if 3 in distance:
            assert distance[2] < distance[3] < distance[1]  # core inside the rim inside edema


def test_channel_contrasts_follow_the_sequences():
    """Edema bright in FLAIR and T2, the rim bright in T1gd, necrosis dark in T1, after per-case scaling."""
    scales = []
    for image, label in cases():
        head = image[0] > 0
        tissue = head & (label == 0)
        mean = {
            name: {v: image[c][label == v].mean() / image[c][tissue].mean() for v in (1, 2, 3) if (label == v).any()}
            for c, name in enumerate(("FLAIR", "T1w", "T1gd", "T2w"))
        }
        assert mean["FLAIR"][1] > 1.3 and mean["T2w"][1] > 1.3
        assert mean["T1w"][2] < 0.6
        if 3 in mean["T1gd"]:
            assert mean["T1gd"][3] > max(mean["T1gd"][1], mean["T1gd"][2], 1.2)
        scales.append(image[0][tissue].mean())
    assert max(scales) / min(scales) > 1.5  # scanner units differ from case to case


def test_white_grey_matter_and_csf():
    """T1w of the healthy head: white matter (0.8) above grey matter (0.6), CSF (0.2) far below both."""
    for image, label in cases(3):
        t1 = image[1][(image[1] > 0) & (label == 0)]
        median = np.median(t1)
        white, grey = t1[t1 > median], t1[t1 <= median]
        assert 1.15 < np.median(white) / np.median(grey[grey > 0.6 * median]) < 1.6
        assert np.mean(t1 < 0.45 * median) > 0.02  # ventricles and sulci


def test_anisotropic_ct_variant(tmp_path):
    root = synthetic.write_nnunet_ct(tmp_path / "CT", 3)
    image = nib.load(root / "imagesTr" / "CT_001_0000.nii.gz")
    zooms = image.header.get_zooms()
    assert zooms[2] / zooms[0] > 3  # thick slices
    hu = image.get_fdata()
    assert hu.min() < -900 and 40 < np.median(hu[nib.load(root / "labelsTr" / "CT_001.nii.gz").get_fdata() == 1]) < 80
