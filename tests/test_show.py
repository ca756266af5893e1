"""`autoseg show`: panels, physical proportions, contours, legend and the case-facts line."""

from __future__ import annotations

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from autoseg.commands.plan import plan_dataset
from autoseg.core.geometry import orientation_code
from autoseg.phantoms import synthetic
from autoseg.visual.cases import load_view
from autoseg.visual.render import case_facts, render_case

SHAPE = (24, 28, 26)


@pytest.fixture
def known_case(tmp_path):
    """(z, y, x) = (10, 20, 16) at 3 × 1 × 0.5 mm, voxel axes pointing left, posterior, superior."""
    image = np.zeros((10, 20, 16), np.float32)
    image[1:9, 2:18, 2:14] = np.linspace(10, 500, 8 * 16 * 12).reshape(8, 16, 12)
    label = np.zeros(image.shape, np.uint8)
    label[2:6, 5:11, 4:12] = 1  # 4 × 6 × 8 = 192 voxels
    label[3:5, 7:9, 6:8] = 2  # 2 × 2 × 2 = 8 voxels inside
    label[4, 12:14, 4:6] = 1  # 4 more: z slice 4 has the most foreground
    affine = np.diag([-0.5, -1.0, 3.0, 1.0])
    for name, data in (("img.nii.gz", image), ("seg.nii.gz", label)):
        nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), affine), str(tmp_path / name))
    return tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz"


def test_case_facts_from_a_known_mask(known_case):
    image, label = known_case
    view = load_view(str(image), label=label)
    facts = case_facts(view)
    voxel_ml = 3.0 * 1.0 * 0.5 / 1000
    assert "shape 10×20×16" in facts and "spacing 3×1×0.5 mm" in facts and "orientation LPS" in facts
    assert "channel 0 0..500" in facts
    assert f"label 1 {(192 - 8 + 4) * voxel_ml:.2f} ml" in facts and f"label 2 {8 * voxel_ml:.2f} ml" in facts


def test_orientation_code_matches_nibabel(tmp_path):
    rng = np.random.default_rng(3)
    for flip in (np.diag([1, 1, 1]), np.diag([-1, 1, 1]), np.diag([1, -1, -1])):
        affine = synthetic.random_affine((2.0, 1.0, 0.8), rng)
        affine[:3, :3] = affine[:3, :3] @ flip
        path = tmp_path / "o.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), affine), str(path))
        assert orientation_code(load_view(str(path)).geometry) == "".join(nib.aff2axcodes(affine))


def test_panels_in_physical_proportions_with_contours(known_case):
    image, label = known_case
    fig = render_case(load_view(str(image), label=label, prediction=label))
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # one channel, three orientations
    assert sorted(ax.get_aspect() for ax in panels) == pytest.approx([2.0, 3.0, 6.0])  # 1/0.5, 3/1, 3/0.5
    titles = " ".join(ax.get_title() for ax in panels)
    assert "axial slice 4" in titles and "coronal slice 5" in titles and "sagittal slice 4" in titles
    axial = next(ax for ax in panels if "axial" in ax.get_title())
    assert len(axial.collections) == 4  # two labels in this slice, truth and prediction
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["1 label 1", "2 label 2", "truth", "prediction"]


def test_show_command_msd_case_with_names(tmp_path, run_cli):
    root = synthetic.write_msd_brain(tmp_path / "Task01", 5, shape=SHAPE)
    out = tmp_path / "case.png"
    result = run_cli("show", root / "imagesTr" / "BRATS_002.nii.gz", "-o", out)
    assert result.exit_code == 0, result.output
    assert "BRATS_002: shape 24×28×26" in result.output and "FLAIR 0.." in result.output
    assert "truth edema" in result.output  # the label file comes from dataset.json
    picture = matplotlib.image.imread(out)
    assert picture.shape[0] > picture.shape[1] > 500  # four rows of three panels


def test_show_channel_prefix_brats_folder_and_planned_case(tmp_path, run_cli, monkeypatch):
    nnunet = synthetic.write_nnunet_brain(tmp_path / "Dataset001", 5, shape=SHAPE)
    result = run_cli("show", nnunet / "imagesTr" / "BRATS_003", "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert "T2w" in result.output and "truth edema" in result.output

    brats = synthetic.write_brats(tmp_path / "BraTS2021", 2, shape=SHAPE)
    view = load_view(str(brats / "BraTS2021_00001"))
    assert set(np.unique(view.label)) <= {0, 1, 2, 3}  # 1/2/4 on disk shown as 1 ED, 2 NCR, 3 ET
    assert view.label_names[1] == "edema" and view.channel_names[0] == "FLAIR"

    work = tmp_path / "work"
    plan_dataset(dataset_dir=nnunet, workdir=work, preprocess=False, show_progress=False)
    monkeypatch.chdir(tmp_path)
    result = run_cli("show", "BRATS_004", "-w", work)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "BRATS_004.png").is_file() and "truth edema" in result.output


def test_show_errors_name_the_problem(tmp_path, run_cli, known_case):
    root = synthetic.write_msd_brain(tmp_path / "Task01", 5, shape=SHAPE)
    result = run_cli("show", root / "imagesTr", "-w", tmp_path / "none")
    assert result.exit_code == 1 and "holds 5 cases" in result.output
    result = run_cli("show", "BRATS_999", "-w", tmp_path / "none")
    assert result.exit_code == 1 and "BRATS_999" in result.output and "autoseg plan" in result.output
    image, _ = known_case
    result = run_cli("show", image, "--label", root / "labelsTr" / "BRATS_001.nii.gz", "-o", tmp_path / "x.png")
    assert result.exit_code == 1 and "shape" in result.output and "pass the mask of this case" in result.output
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((root / "imagesTr" / "BRATS_001.nii.gz").read_bytes()[:2000])  # a truncated download
    for args in ([broken], [image, "--label", root / "dataset.json"]):
        result = run_cli("show", *args, "-o", tmp_path / "y.png")
        assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output, result.output
    result = run_cli("show", image, "-o", tmp_path / "case.jpg")
    assert result.exit_code == 0 and (tmp_path / "case.jpg").read_bytes()[:2] == b"\xff\xd8"  # a real JPEG
    result = run_cli("show", image, "-o", tmp_path / "case.gif")
    assert result.exit_code == 1 and ".png, .jpg" in result.output and not (tmp_path / "case.gif").exists()
