"""`autoseg import` of nnU-Net v2 models, without nnU-Net: the results folders are written here by hand.

A results folder is what nnU-Net writes (plans.json, dataset.json, dataset_fingerprint.json,
fold_k/checkpoint_final.pth); the checkpoint is ``torch.save`` of a dict as nnU-Net's trainer saves it,
with nnU-Net's state-dict key names (incl. the duplicate keys its modules register) and random weights.
The agreement with nnU-Net's own predictions is in test_nnunet_agreement.py (slow suite).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.core.plan import Configuration, Network, Normalization, Resampling, load_plan
from autoseg.deploy.nnunet import autoseg_key
from autoseg.inference.instructions import read_instructions
from autoseg.model.network import ResidualBlock, UNet
from autoseg.phantoms import synthetic

SHAPE = (16, 20, 18)
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def _conv_block(prefix: str, block: torch.nn.Sequential, out: dict) -> None:
    """ConvDropoutNormReLU's keys: conv, norm, and the same modules again under all_modules."""
    for name, index in (("conv", 0), ("norm", 1)):
        for p, tensor in block[index].state_dict().items():
            out[f"{prefix}.{name}.{p}"] = tensor
            out[f"{prefix}.all_modules.{index}.{p}"] = tensor


def nnunet_state_dict(network: UNet) -> dict[str, torch.Tensor]:
    """The state dict dynamic_network_architectures' PlainConvUNet / ResidualEncoderUNet has for this topology."""
    out: dict[str, torch.Tensor] = {}
    residual = not isinstance(network.stem, torch.nn.Identity)
    if residual:
        _conv_block("encoder.stem.convs.0", network.stem, out)
    for s, stage in enumerate(network.encoder):
        for b, block in enumerate(stage):
            if not residual:
                _conv_block(f"encoder.stages.{s}.0.convs.{b}", block, out)
                continue
            assert isinstance(block, ResidualBlock)
            _conv_block(f"encoder.stages.{s}.blocks.{b}.conv1", block.conv1, out)
            _conv_block(f"encoder.stages.{s}.blocks.{b}.conv2", block.conv2, out)
            for i, op in enumerate(block.skip):
                if isinstance(op, torch.nn.Sequential):
                    _conv_block(f"encoder.stages.{s}.blocks.{b}.skip.{i}", op, out)
    out.update({f"decoder.{k}": v for k, v in list(out.items())})  # the decoder keeps a reference to the encoder
    for s, stage in enumerate(network.decoder):
        for i, block in enumerate(stage):
            _conv_block(f"decoder.stages.{s}.convs.{i}", block, out)
    for s, (up, head) in enumerate(zip(network.upsample, network.heads)):
        out.update({f"decoder.transpconvs.{s}.{p}": t for p, t in up.state_dict().items()})
        out.update({f"decoder.seg_layers.{s}.{p}": t for p, t in head.state_dict().items()})
    return out


def _arch(residual: bool, features: list[int], n_classes: int) -> dict:
    kwargs = {
        "n_stages": len(features),
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * len(features),
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (len(features) - 1),
        "n_conv_per_stage_decoder": [1 if residual else 2] * (len(features) - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if residual:
        kwargs["n_blocks_per_stage"] = [1, 2, 2][: len(features)]
    else:
        kwargs["n_conv_per_stage"] = [2] * len(features)
    return {
        "network_class_name": RESENC if residual else PLAIN,
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _resampling(order: int) -> dict:
    return {"is_seg": False, "order": order, "order_z": 0, "force_separate_z": None}


def nnunet_plans(name: str, residual: bool, channels: int, schemes: list[str], n_classes: int) -> dict:
    features = [4, 8, 16]
    return {
        "dataset_name": name,
        "plans_name": "nnUNetResEncUNetMPlans" if residual else "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": list(SHAPE),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 16, 16],
                "median_image_size_in_voxels": [16.0, 20.0, 18.0],
                "spacing": [2.0, 1.0, 1.0],
                "normalization_schemes": schemes,
                "use_mask_for_norm": [s == "ZScoreNormalization" for s in schemes],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": _resampling(3),
                "resampling_fn_seg_kwargs": {**_resampling(1), "is_seg": True},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": _resampling(1),
                "architecture": _arch(residual, features, n_classes),
                "batch_dice": False,
            },
            "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "lowres", "spacing": [4.0, 2.0, 2.0]},
        },
        "experiment_planner_used": "nnUNetPlannerResEncM" if residual else "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {
                "max": 3000.0,
                "mean": 80.0,
                "median": 90.0,
                "min": -1000.0,
                "percentile_00_5": -100.0,
                "percentile_99_5": 250.0,
                "std": 60.0,
            }
            for c in range(channels)
        },
    }


def write_results_folder(
    root: Path,
    *,
    residual: bool = False,
    regions: bool = False,
    schemes: tuple[str, ...] = ("ZScoreNormalization", "CTNormalization"),
    mirror_axes: tuple[int, ...] | None = (0, 1, 2),
    folds: tuple[int, ...] = (0, 1),
    extra: dict | None = None,
) -> Path:
    """``root/Dataset042_Phantom/nnUNetTrainer__<plans>__3d_fullres`` as nnU-Net writes it."""
    name = "Dataset042_Phantom"
    labels = (
        {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
        if regions
        else {"background": 0, "edema": 1, "core": 2, "enhancing": 3}
    )
    plans = nnunet_plans(name, residual, len(schemes), list(schemes), 3)
    model = root / name / f"nnUNetTrainer__{plans['plans_name']}__3d_fullres"
    model.mkdir(parents=True)
    dataset = {"channel_names": {str(c): f"ch{c}" for c in range(len(schemes))}, "labels": labels}
    dataset.update({"numTraining": 4, "file_ending": ".nii.gz"})
    if regions:
        dataset["regions_class_order"] = [1, 2, 3]
    fingerprint = {
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [list(SHAPE)] * 4,
        "spacings": [[2.0, 1.0, 1.0]] * 4,
    }
    for file, document in (("plans.json", plans), ("dataset.json", dataset), ("dataset_fingerprint.json", fingerprint)):
        (model / file).write_text(json.dumps(document))
    for fold in folds:
        write_checkpoint(model / f"fold_{fold}" / "checkpoint_final.pth", plans, dataset, fold, mirror_axes, extra)
    return model


def _network(plans: dict, n_classes: int, channels: int) -> UNet:
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    residual = "n_blocks_per_stage" in kw
    topology = Network(
        kw["kernel_sizes"],
        kw["strides"],
        kw["features_per_stage"],
        2,
        kw["n_conv_per_stage_decoder"][0],
        "residual_encoder" if residual else "plain",
        kw.get("n_blocks_per_stage"),
    )
    return UNet(channels, n_classes, topology, 3)


def write_checkpoint(path: Path, plans: dict, dataset: dict, fold: int, mirror_axes, extra: dict | None) -> None:
    torch.manual_seed(fold)
    n_classes = 3 if "regions_class_order" in dataset else len(dataset["labels"])
    network = _network(plans, n_classes, len(dataset["channel_names"]))
    for p in network.parameters():  # the zero-initialised norms of residual blocks would hide a wrong mapping
        torch.nn.init.normal_(p, 0.0, 0.3)
    path.parent.mkdir(parents=True)
    checkpoint = {
        "network_weights": nnunet_state_dict(network),
        "optimizer_state": {"state": {}, "param_groups": []},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)], "lrs": [0.01]},
        "_best_ema": np.float64(0.4),
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": fold,
            "dataset_json": dataset,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": mirror_axes,
        **(extra or {}),
    }
    torch.save(checkpoint, path)


def _image(folder: Path, channels: int = 2) -> Path:
    rng = np.random.default_rng(0)
    affine = synthetic.random_affine((2.0, 1.1, 0.9), rng)
    for c in range(channels):
        image = nib.Nifti1Image(rng.normal(100, 30, (18, 22, 14)).astype(np.float32), affine)
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(image, str(folder / f"case_{c:04d}.nii.gz"))
    return folder


def test_every_nnunet_key_maps_onto_autoseg_modules():
    for residual in (False, True):
        plans = nnunet_plans("x", residual, 1, ["ZScoreNormalization"], 3)
        network = _network(plans, 3, 1)
        mapped = {autoseg_key(k) for k in nnunet_state_dict(network)} - {None}
        assert mapped == set(network.state_dict()), residual


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "resenc"])
def test_import_folder_then_predict_keeps_the_input_geometry(tmp_path, run_cli, residual):
    model = write_results_folder(tmp_path / "results", residual=residual)
    work = tmp_path / "work"
    result = run_cli("import", model, "-w", work)
    assert result.exit_code == 0, result.output
    plan = load_plan(work / "Dataset042_Phantom" / "plans.json")
    config = plan.configuration("3d_fullres")
    assert list(plan.configurations) == ["3d_fullres"]
    assert plan.imported_from.trainer == "nnUNetTrainer" and plan.imported_from.tool == "nnU-Net v2"
    assert config.network.architecture == ("residual_encoder" if residual else "plain")
    assert config.mirror_axes == [0, 1, 2]
    assert config.normalization == [
        Normalization("zscore", use_mask=True),
        Normalization("ct", False, 80.0, 60.0, -100.0, 250.0),
    ]
    assert config.resampling == Resampling(3, 1, 1, 0, 3.0)
    assert sorted(p.name for p in (work / "Dataset042_Phantom" / "models" / "3d_fullres").iterdir()) == [
        "fold_0",
        "fold_1",
    ]
    cases = _image(tmp_path / "in")
    result = run_cli("predict", "-i", cases, "-o", tmp_path / "out", "-w", work, "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    source = nib.load(str(cases / "case_0000.nii.gz"))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3}


def test_import_of_an_exported_zip_and_its_post_processing(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results")
    crossval = model / "crossval_results_folds_0_1"
    crossval.mkdir()
    (crossval / "postprocessing.json").write_text(
        json.dumps(
            {
                "input_folder": {},
                "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 2,
                "postprocessing_kwargs": [{"labels_or_regions": [1, 2, 3]}, {"labels_or_regions": 2}],
            }
        )
    )
    (crossval / "postprocessing.pkl").write_bytes(b"never read")
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in model.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(tmp_path / "results").as_posix())
    result = run_cli("import", archive, "-w", tmp_path / "work")
    assert result.exit_code == 0, result.output
    instructions = read_instructions(tmp_path / "work" / "Dataset042_Phantom" / "inference.json")
    assert instructions.folds == {"3d_fullres": (0, 1)}
    assert [s.values for s in instructions.postprocessing] == [(1, 2, 3), (2,)]


def test_region_model_paints_in_regions_class_order(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results", regions=True, mirror_axes=None, folds=(0,))
    result = run_cli("import", model, "-w", tmp_path / "work")
    assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "work" / "Dataset042_Phantom" / "plans.json")
    assert [(r.name, r.labels, r.paint_value) for r in plan.regions] == [
        ("whole", [1, 2, 3], 1),
        ("core", [2, 3], 2),
        ("enhancing", [3], 3),
    ]
    assert plan.num_classes == 3
    assert plan.configuration("3d_fullres").mirror_axes == []  # a trainer that mirrors nothing: no TTA
    result = run_cli("predict", "-i", _image(tmp_path / "in"), "-o", tmp_path / "out", "-w", tmp_path / "work")
    assert result.exit_code == 0, result.output


def _edit_plans(model: Path, change) -> None:
    plans = json.loads((model / "plans.json").read_text())
    change(plans["configurations"]["3d_fullres"])
    (model / "plans.json").write_text(json.dumps(plans))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["architecture"].update(network_class_name="nnunetv2.MedNeXt"), "network 'nnunetv2.MedNeXt'"),
        (lambda c: c.update(normalization_schemes=["Foo", "CTNormalization"]), "normalisation scheme 'Foo'"),
        (lambda c: c.update(resampling_fn_data="resample_torch_fornnunet"), "resample_torch_fornnunet"),
        (lambda c: c.update(previous_stage="3d_lowres"), "cascade"),
        (lambda c: c["architecture"]["arch_kwargs"].update(features_per_stage=[4, 8, 32]), "do not fit"),
    ],
    ids=["network", "normalisation", "resampling", "cascade", "weights"],
)
def test_what_cannot_be_reproduced_is_refused_by_name_and_nothing_installed(tmp_path, run_cli, change, message):
    model = write_results_folder(tmp_path / "results")
    _edit_plans(model, change)
    work = tmp_path / "work"
    result = run_cli("import", model, "-w", work)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not any(p.name == "Dataset042_Phantom" for p in work.iterdir())


class Payload:
    """Stands for any Python object a pickle could carry."""


def test_a_checkpoint_holding_objects_is_never_unpickled(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results", extra={"hook": Payload()})
    result = run_cli("import", model, "-w", tmp_path / "work")
    assert result.exit_code == 1
    assert "never unpickles" in result.output and "Payload" in result.output


def test_an_installed_dataset_is_not_replaced_without_overwrite(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results")
    assert run_cli("import", model, "-w", tmp_path / "work").exit_code == 0
    again = run_cli("import", model, "-w", tmp_path / "work")
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert run_cli("import", model, "-w", tmp_path / "work", "--overwrite").exit_code == 0


def test_imported_networks_build_from_the_plan_alone():
    config = Configuration(
        "3d_fullres",
        3,
        [1.0] * 3,
        [16] * 3,
        2,
        [16] * 3,
        Network([[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [4, 8], 2, 1, "residual_encoder", [1, 2]),
        [Normalization("zscore")],
        Resampling(),
        False,
        "x",
        0,
    )
    from autoseg.model.network import build_network

    network = build_network(config, 1, 2, deep_supervision=True).train()
    outputs = network(torch.zeros(1, 1, 16, 16, 16))
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 16, 16, 16)]


def test_resenc_preset_plans_trains_and_predicts_end_to_end(tmp_path, run_cli):
    from autoseg.workflows.fold import train_and_validate

    dataset = synthetic.write_nnunet_brain(tmp_path / "raw", 5, shape=(24, 28, 26), channels=("FLAIR",))
    work = tmp_path / "work"
    result = run_cli("plan", "-d", dataset, "-w", work, "-c", "3d_fullres", "--preset", "resenc-m", "-j", "1")
    assert result.exit_code == 0, result.output
    assert "3d_fullres_resenc_m" in result.output
    plan = load_plan(work / "raw" / "plans.json")
    resenc = plan.configuration("3d_fullres_resenc_m")
    assert resenc.network.architecture == "residual_encoder" and resenc.data_identifier == "3d_fullres"
    trained = train_and_validate(
        workdir=work,
        configuration="3d_fullres_resenc_m",
        fold="0",
        epochs=1,
        iterations=2,
        val_iterations=1,
        workers=0,
        device="cpu",
        show_progress=False,
    )
    assert set(trained.validation["mean"]) >= {"edema"}
    out = tmp_path / "out"
    result = run_cli("predict", "-i", dataset / "imagesTr", "-o", out, "-w", work, "-c", "3d_fullres_resenc_m")
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.nii.gz"))) == 5
    result = run_cli("plan", "-d", dataset, "-w", work, "-c", "3d_fullres", "-j", "1")  # planning again keeps it
    assert result.exit_code == 0, result.output
    assert load_plan(work / "raw" / "plans.json").configuration("3d_fullres_resenc_m") == resenc


def test_an_unknown_preset_is_refused_in_one_line(tmp_path, run_cli):
    dataset = synthetic.write_nnunet_brain(tmp_path / "raw", 2, shape=(16, 20, 18), channels=("FLAIR",))
    result = run_cli("plan", "-d", dataset, "-w", tmp_path / "work", "--preset", "resenc-xxl")
    assert result.exit_code == 1 and "unknown preset 'resenc-xxl'" in result.output
    assert not (tmp_path / "work" / "raw" / "plans.json").exists()


def test_a_plans_json_that_is_not_nnunets_is_refused_in_one_line(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results")
    plans = json.loads((model / "plans.json").read_text())
    del plans["transpose_forward"]
    (model / "plans.json").write_text(json.dumps(plans))
    result = run_cli("import", model, "-w", tmp_path / "work")
    assert result.exit_code == 1 and "transpose_forward" in result.output and "Traceback" not in result.output


def test_an_autoseg_dataset_folder_is_not_taken_for_an_nnunet_model(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results")
    assert run_cli("import", model, "-w", tmp_path / "work").exit_code == 0
    result = run_cli("import", tmp_path / "work" / "Dataset042_Phantom", "-w", tmp_path / "other")
    assert result.exit_code == 1 and "neither an nnU-Net v2 results folder" in result.output


def test_an_imported_resenc_model_exports_to_onnx_and_predicts_the_same_masks(tmp_path, run_cli):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = write_results_folder(tmp_path / "results", residual=True, folds=(0,))
    work = tmp_path / "work"
    assert run_cli("import", model, "-w", work).exit_code == 0
    archive = tmp_path / "model.zip"
    result = run_cli("export", "-w", work, "-o", archive, "--onnx")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(archive) as zf:
        spec = json.loads(zf.read("Dataset042_Phantom/deployment.json"))
    entry = spec["configurations"][0]
    assert entry["ensemble"] == "mean_of_logits_over_folds_and_mirrors" and entry["mirroring"]["axes"] == [0, 1, 2]
    cases = _image(tmp_path / "in")
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        result = run_cli("predict", "-m", archive, "-i", cases, "-o", out, "--backend", backend, "--device", "cpu")
        assert result.exit_code == 0, result.output
        masks[backend] = np.asarray(nib.load(str(out / "case.nii.gz")).dataobj)
    assert (masks["torch"] == masks["onnxruntime"]).mean() > 0.999


def test_imported_models_blend_tiles_with_nnunets_gaussian():
    from autoseg.inference.sliding_window import nnunet_gaussian

    weights = nnunet_gaussian([8, 6, 5]).numpy()
    assert weights.shape == (8, 6, 5) and weights.max() == 1.0
    assert np.unravel_index(weights.argmax(), weights.shape) == (4, 3, 2)  # the impulse at patch // 2, as nnU-Net
    assert weights.min() > 0
    assert np.all(np.isin(weights * 10, np.float16(weights * 10)))  # float16 weights, as nnU-Net stores them


def test_a_dataset_folder_needs_exactly_one_model_folder(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results", folds=(0,))
    dataset = model.parent
    assert run_cli("import", dataset, "-w", tmp_path / "work").exit_code == 0  # its only model folder
    (dataset / "nnUNetTrainer__nnUNetPlans__2d").mkdir()
    for name in ("plans.json", "dataset.json"):
        (dataset / "nnUNetTrainer__nnUNetPlans__2d" / name).write_text((model / name).read_text())
    result = run_cli("import", dataset, "-w", tmp_path / "other")
    assert result.exit_code == 1 and "2 nnU-Net model folders" in result.output


def test_a_zip_with_an_unsafe_member_is_refused_before_anything_is_written(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results", folds=(0,))
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in model.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(tmp_path / "results").as_posix())
        zf.writestr("Dataset042_Phantom/../../evil.txt", "x")
    result = run_cli("import", archive, "-w", tmp_path / "work")
    assert result.exit_code == 1 and "unsafe" in result.output
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "Dataset042_Phantom").exists()


def _training_data(folder: Path, n_cases: int = 6) -> Path:
    """Labelled phantoms declaring the hand-written model's channels and labels: the dataset it 'learnt' from."""
    synthetic.write_nnunet_brain(folder, n_cases, shape=(18, 22, 20), channels=("FLAIR", "T1w"))
    record = json.loads((folder / "dataset.json").read_text())
    record["channel_names"] = {"0": "ch0", "1": "ch1"}
    record["labels"] = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}
    (folder / "dataset.json").write_text(json.dumps(record))
    return folder


def test_import_with_its_training_data_makes_int8_openvino_uncertainty_and_qc_work(tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    model = write_results_folder(tmp_path / "results", folds=(0, 1))
    bare, work = tmp_path / "bare", tmp_path / "work"
    assert run_cli("import", model, "-w", bare).exit_code == 0
    refused = run_cli("export", "-w", bare, "-o", tmp_path / "bare.zip", "--int8")
    assert "INT8 3d_fullres fold 0: refused (" in refused.output  # nothing to calibrate or check it on
    data = _training_data(tmp_path / "raw")

    result = run_cli("import", model, "-w", work, "--data", data, "--no-progress", "-j", "1")
    assert result.exit_code == 0, result.output
    root = work / "Dataset042_Phantom"
    splits = json.loads((root / "splits.json").read_text())
    assert len(splits["folds"]) == 5 and sorted(splits["folds"][0]["train"] + splits["folds"][0]["val"]) == [
        f"BRATS_{i:03d}" for i in range(1, 7)
    ]
    assert len(list((root / "preprocessed" / "nnUNetPlans_3d_fullres").glob("*.npy"))) >= 6
    assert load_plan(root / "plans.json") == load_plan(bare / "Dataset042_Phantom" / "plans.json")  # nnU-Net's plan

    result = run_cli("export", "-w", work, "-o", tmp_path / "int8.zip", "--int8")
    assert result.exit_code == 0, result.output
    for fold in (0, 1):
        assert f"INT8 3d_fullres fold {fold}: " in result.output, result.output
    assert result.output.count("Dice vs fp32") == 2, result.output  # checked on each fold's validation cases
    cases = _image(tmp_path / "in")
    masks = {}
    for backend, extra in (("torch", ["--uncertainty"]), ("openvino", [])):
        out = tmp_path / backend
        result = run_cli("predict", "-w", work, "-i", cases, "-o", out, "--backend", backend, "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
        masks[backend] = np.asarray(nib.load(str(out / "case.nii.gz")).dataobj)
    assert (masks["torch"] == masks["openvino"]).mean() > 0.999
    bare_out = tmp_path / "bare_out"
    assert run_cli("predict", "-w", bare, "-i", cases, "-o", bare_out, "--device", "cpu").exit_code == 0
    assert np.array_equal(np.asarray(nib.load(str(bare_out / "case.nii.gz")).dataobj), masks["torch"])
    entry = json.loads((tmp_path / "torch" / "report.json").read_text())["cases"]["case"]
    assert entry["intensities"] and all(v["training_ml"][1] > 0 for v in entry["volumes"].values()), entry
    assert set(entry["structures"]) == {"edema", "core", "enhancing"}
    assert all(0 <= s["estimated_dice"] <= 1 for s in entry["structures"].values())
    bare_report = json.loads((bare_out / "report.json").read_text())["cases"]["case"]
    assert all(v.get("training_ml", [None])[1] is None for v in bare_report["volumes"].values())  # what --data added


def test_import_data_that_is_not_the_models_dataset_is_refused_and_nothing_installed(tmp_path, run_cli):
    model = write_results_folder(tmp_path / "results", folds=(0,))
    data = _training_data(tmp_path / "raw", 2)
    record = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps(record | {"labels": {"background": 0, "tumour": 1}}))
    result = run_cli("import", model, "-w", tmp_path / "work", "--data", data, "--no-progress")
    assert result.exit_code == 1 and "is not the dataset model Dataset042_Phantom learnt from" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "work" / "Dataset042_Phantom").exists()


def test_an_imported_model_writes_dicom_seg_from_a_dicom_series(tmp_path, run_cli):
    pytest.importorskip("highdicom")
    from test_dicom_seg import assert_valid, rebuild_on_grid

    from autoseg.data.io.dicom_seg import segments_for

    model = write_results_folder(tmp_path / "results", schemes=("ZScoreNormalization",), folds=(0,))
    work = tmp_path / "work"
    assert run_cli("import", model, "-w", work).exit_code == 0
    series = tmp_path / "series"
    volume = np.random.default_rng(1).normal(100, 30, (12, 20, 18))
    synthetic.write_dicom_series(volume, (2.0, 1.0, 1.0), series, origin=(-5.0, 3.0, 10.0))
    out = tmp_path / "out"
    result = run_cli("predict", "-w", work, "-i", series, "-o", out, "--output-type", "both", "--device", "cpu")
    assert result.exit_code == 0, result.output
    import highdicom as hd

    from autoseg.data.io.images import read_label

    nifti, _ = read_label(out / "series.nii.gz")
    assert len(np.unique(nifti)) > 1, "the test needs a mask with foreground"
    assert_valid(out / "series.dcm")
    segments = segments_for({"background": 0, "edema": 1, "core": 2, "enhancing": 3})
    per_segment = rebuild_on_grid(hd.seg.segread(out / "series.dcm"), series, len(segments))
    for k, segment in enumerate(segments):
        np.testing.assert_array_equal(per_segment[..., k], np.isin(nifti, segment.values).astype(np.uint8))
