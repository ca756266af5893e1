"""nnU-Net's ``3d_cascade_fullres``: planned with ``3d_lowres``, trained on its cross-validation masks, predicted
after it, selected like any configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.core.errors import PlanError, WorkspaceError
from autoseg.core.files import write_json
from autoseg.core.plan import plan_from_json, to_json
from autoseg.core.workspace import find_dataset
from autoseg.data.preprocessing.fingerprint import load_fingerprint
from autoseg.phantoms import synthetic
from autoseg.planning.planner import plan_from_fingerprint, with_presets
from autoseg.training.augmentation import augmentation_params, train_transforms, val_transforms
from autoseg.training.cascade import RandomBinaryOperator, RemoveRandomComponent, dilate, erode
from autoseg.training.sampling import CaseRecord, PatchSampler

PLANS = Path(__file__).resolve().parents[1] / "plans"
#: a phantom large enough, under a tiny GPU budget, for 3d_lowres (and with it the cascade) to be planned
SHAPE, GPU_GB = (40, 48, 44), 0.01
TINY = {"epochs": 1, "iterations": 2, "val_iterations": 1, "workers": 0, "device": "cpu", "show_progress": False}


def test_the_plan_holds_the_cascade_exactly_when_it_holds_3d_lowres():
    liver = load_fingerprint(PLANS / "Task03_Liver" / "fingerprint.json")
    plan = plan_from_fingerprint(liver)
    cascade, full = plan.configuration("3d_cascade_fullres"), plan.configuration("3d_fullres")
    assert dataclasses.replace(cascade, name="3d_fullres", inherits_from=None, previous_stage=None) == full
    assert to_json(plan)["configurations"]["3d_cascade_fullres"] == {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }  # nnU-Net's own entry
    assert plan_from_json(json.loads(json.dumps(to_json(plan)))) == plan
    assert plan.next_stages("3d_lowres") == ["3d_cascade_fullres"]
    assert plan.input_channels(cascade) == 1 + 2 and plan.input_channels(full) == 1  # CT; liver and tumour
    asked = plan_from_fingerprint(liver, configurations=["3d_cascade_fullres"])
    assert set(asked.configurations) == {"3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    assert "3d_cascade_fullres" not in plan_from_fingerprint(liver, configurations=["3d_lowres"]).configurations
    assert (
        "3d_cascade_fullres" in plan_from_fingerprint(liver, configurations=["3d_lowres", "3d_fullres"]).configurations
    )
    brain = load_fingerprint(PLANS / "Task01_BrainTumour" / "fingerprint.json")
    assert "3d_cascade_fullres" not in plan_from_fingerprint(brain).configurations
    with pytest.raises(PlanError, match=r"\['3d_cascade_fullres'\] do not apply"):
        plan_from_fingerprint(brain, configurations=["3d_cascade_fullres"])


def test_a_preset_cascade_reads_the_preset_lowres_and_a_missing_stage_is_refused():
    liver = load_fingerprint(PLANS / "Task03_Liver" / "fingerprint.json")
    plan = with_presets(plan_from_fingerprint(liver), liver, ["resenc-l"])
    cascade = plan.configuration("3d_cascade_fullres_resenc_l")
    assert (cascade.inherits_from, cascade.previous_stage) == ("3d_fullres_resenc_l", "3d_lowres_resenc_l")
    assert plan_from_json(json.loads(json.dumps(to_json(plan)))) == plan
    data = to_json(plan)
    del data["configurations"]["3d_lowres"]
    with pytest.raises(PlanError, match="previous_stage '3d_lowres', which is not in the plan"):
        plan_from_json(data)


def test_dilation_and_erosion_are_the_ball_operators():
    mask = np.zeros((15, 15, 15), bool)
    mask[5:10, 6:9, 4:11] = True
    ball = np.linalg.norm(np.mgrid[-2:3, -2:3, -2:3], axis=0) <= 2
    from scipy import ndimage

    np.testing.assert_array_equal(dilate(mask, 2.0), ndimage.binary_dilation(mask, ball))
    np.testing.assert_array_equal(erode(mask, 1.0), ndimage.binary_erosion(mask, ball[1:4, 1:4, 1:4], border_value=1))
    assert not dilate(np.zeros_like(mask), 3).any() and erode(np.ones_like(mask), 3).all()


def test_perturbations_keep_the_channels_one_hot_and_spare_large_components():
    image = torch.zeros((3, 20, 20, 20))  # one image channel, then labels 1 and 2 one-hot
    image[1, 2:6, 2:6, 2:6] = 1  # a small component of label 1
    image[1, 10:20, :, :] = 1  # and one covering half the patch
    image[2, 6:9, 8:12, 8:12] = 1
    grown = RandomBinaryOperator([-2, -1])._apply_to_image(image.clone(), operations=[(-1, "dilate", 2.0)])
    assert grown[2].sum() > image[2].sum() and (grown[1:].sum(0) <= 1).all()  # label 2 took voxels from label 1
    torch.testing.assert_close(grown[0], image[0])
    np.random.seed(0)
    removed = RemoveRandomComponent([-2, -1])._apply_to_image(image.clone(), channels=[-2])
    assert removed[1, 2:6, 2:6, 2:6].sum() == 0 and removed[1, 10:].sum() == image[1, 10:].sum()


def test_the_previous_mask_moves_with_the_image_and_joins_it_one_hot():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 1, 24, 24, 24)).astype(np.float32)
    seg = np.zeros((2, 2, 24, 24, 24), np.int16)
    seg[:, :, 6:18, 6:18, 6:18] = 1
    seg[:, :, 9:14, 9:14, 9:14] = 2
    seg[:, :, :2] = -1  # outside the image
    params = dataclasses.replace(augmentation_params([16, 16, 16], stage_labels=[1, 2]), p_rotation=1.0, p_scale=1.0)
    np.random.seed(0)
    out = train_transforms([16, 16, 16], params)(data=data.copy(), seg=seg.copy())
    assert out["data"].shape == (2, 3, 16, 16, 16) and out["target"].shape == (2, 1, 16, 16, 16)
    stage = out["data"][:, 1:]
    assert set(torch.unique(stage).tolist()) <= {0.0, 1.0} and (stage.sum(1) <= 1).all()
    checked = val_transforms([1, 2])(data=data[:, :, 4:20, 4:20, 4:20].copy(), seg=seg[:, :, 4:20, 4:20, 4:20].copy())
    assert checked["data"].shape == (2, 3, 16, 16, 16)
    np.testing.assert_array_equal(checked["data"][:, 2].numpy(), (checked["target"][:, 0] == 2).numpy())


def test_the_sampler_cuts_the_previous_mask_where_it_cuts_the_label(tmp_path):
    seg = np.random.default_rng(1).integers(0, 3, (20, 22, 18)).astype(np.int8)
    np.save(tmp_path / "c.npy", np.zeros((1, *seg.shape), np.float32))
    np.save(tmp_path / "c_seg.npy", seg)
    np.save(tmp_path / "previous.npy", seg)
    case = CaseRecord("c", tmp_path, {1: np.array([[10, 11, 9]])}, previous=tmp_path / "previous.npy")
    batch = next(PatchSampler([case], [16, 16, 16], 4, forced=[False, False, True, True]))
    assert batch["seg"].shape == (4, 2, 16, 16, 16)
    np.testing.assert_array_equal(batch["seg"][:, 0], batch["seg"][:, 1])


@pytest.fixture
def cascade_work(tmp_path) -> tuple[Path, Path]:
    """A phantom planned with 3d_lowres and the cascade, split into two folds."""
    from autoseg.commands.plan import plan_dataset

    dataset = synthetic.write_msd_brain(tmp_path / "Task01_BrainTumour", 4, shape=SHAPE)
    work = tmp_path / "work"
    report = plan_dataset(
        dataset_dir=dataset,
        workdir=work,
        gpu_memory_gb=GPU_GB,
        configurations=["3d_cascade_fullres"],
        show_progress=False,
    )
    assert set(report.plan.configurations) == {"3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    assert set(report.preprocessed) == {"3d_fullres", "3d_lowres"}  # the cascade reads 3d_fullres's data
    ids = sorted(c.case_id for c in report.spec.cases)
    folds = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:]}]
    write_json(find_dataset(work).splits, {"version": 1, "source": "test", "folds": folds})
    return work, dataset


def test_train_refuses_the_cascade_without_the_lowres_predictions(cascade_work, run_cli):
    work, _ = cascade_work
    result = run_cli("train", "-c", "3d_cascade_fullres", "--fold", "0", "-w", work, "--device", "cpu")
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "3d_lowres's cross-validation predictions" in line and "fold(s) 0, 1" in line
    assert not (find_dataset(work).model("3d_cascade_fullres", 0) / "log.jsonl").exists()


@pytest.mark.slow
def test_cascade_trains_predicts_with_exact_geometry_selects_and_exports(cascade_work, tmp_path, run_cli):
    from autoseg.commands.select import select_model
    from autoseg.workflows.fold import train_and_validate

    work, dataset = cascade_work
    workspace = find_dataset(work)
    for fold in ("0", "1"):
        train_and_validate(workdir=work, configuration="3d_lowres", fold=fold, tta=False, val_every=0, **TINY)
    masks = sorted(p.name for p in workspace.root.glob("models/3d_lowres/fold_*/next_stage/3d_fullres/*.npy"))
    assert masks == sorted(f"{c}.npy" for f in json.loads(workspace.splits.read_text())["folds"] for c in f["val"])
    case = masks[0].removesuffix(".npy")
    record = json.loads((workspace.preprocessed("3d_fullres") / f"{case}.json").read_text())
    mask = np.load(workspace.next_stage("3d_lowres", 0, "3d_fullres") / masks[0])
    assert mask.shape == tuple(record["shape_after_resampling"])
    for fold in ("0", "1"):
        result = train_and_validate(workdir=work, configuration="3d_cascade_fullres", fold=fold, tta=False, **TINY)
        assert set(result.validation["cases"]) == set(
            json.loads(workspace.splits.read_text())["folds"][int(fold)]["val"]
        )
    weights = torch.load(workspace.checkpoint("3d_cascade_fullres", 0), weights_only=True)["weights"]
    assert weights["encoder.0.0.0.weight"].shape[1] == 4 + 3  # the image's four channels, three labels one-hot

    out = tmp_path / "masks"
    images = dataset / "imagesTr"
    predicted = run_cli(
        "predict", "-i", images, "-o", out, "-w", work, "-c", "3d_cascade_fullres", "--device", "cpu", "--no-tta"
    )
    assert predicted.exit_code == 0, predicted.output
    for source in sorted(images.glob("*.nii.gz"))[:2]:
        mask, image = nib.load(out / source.name), nib.load(source)
        assert mask.shape == image.shape[:3]
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)

    onnx = tmp_path / "onnx"  # the runtimes read the exported graph, with its extra input channels
    options = ["-w", work, "-c", "3d_cascade_fullres", "--device", "cpu", "--no-tta", "--backend", "onnxruntime"]
    ran = run_cli("predict", "-i", images, "-o", onnx, *options)
    assert ran.exit_code == 0, ran.output
    for source in sorted(images.glob("*.nii.gz"))[:2]:
        np.testing.assert_array_equal(nib.load(onnx / source.name).get_fdata(), nib.load(out / source.name).get_fdata())
    document = select_model(workdir=work, show_progress=False)
    assert ["3d_cascade_fullres"] in [c["configurations"] for c in document["candidates"]]

    refused = run_cli("export", "-w", work, "-o", tmp_path / "m.zip", "-c", "3d_cascade_fullres", "--onnx")
    assert refused.exit_code == 1 and "3d_cascade_fullres is a cascade stage" in refused.output
    exported = run_cli("export", "-w", work, "-o", tmp_path / "m.zip", "-c", "3d_cascade_fullres", "--no-onnx")
    assert exported.exit_code == 0, exported.output
    again = run_cli(
        "predict", "-i", images, "-o", tmp_path / "again", "-m", tmp_path / "m.zip", "--device", "cpu", "--no-tta"
    )
    assert again.exit_code == 0, again.output
    for source in sorted(images.glob("*.nii.gz"))[:2]:
        np.testing.assert_array_equal(
            nib.load(tmp_path / "again" / source.name).get_fdata(), nib.load(out / source.name).get_fdata()
        )


def test_a_first_stage_predicts_without_and_a_cascade_only_with_its_previous_stage():
    from autoseg.inference.fold_ensemble import _check_stage

    liver = plan_from_fingerprint(load_fingerprint(PLANS / "Task03_Liver" / "fingerprint.json"))
    with pytest.raises(WorkspaceError, match="predicts from 3d_lowres's masks, not none"):
        _check_stage(liver.configuration("3d_cascade_fullres"), None)
