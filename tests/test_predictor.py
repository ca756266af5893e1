"""The composed predictor on random weights (fast): the API's outputs agree with each other, the
ensemble is the mean of its members on the input grid, the temperature changes no label, the TTA
options, and ``--compile`` (torch.compile) predicts what eager torch does or is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import save_checkpoint
from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import load_plan
from autoseg.data.io.images import read_channels
from autoseg.data.preprocessing.restore import paint_labels, to_output_values
from autoseg.inference.choice import load_predictor
from autoseg.inference.compiled import CompiledNetwork
from autoseg.inference.predictor import Predictor
from autoseg.inference.sliding_window import WindowSettings, predict_probabilities
from autoseg.model.network import build_network
from autoseg.phantoms import synthetic

DATASET = "Task01_BrainTumour"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work folder with one random-weight fold of 3d_fullres and of 2d, and no training."""
    root = tmp_path_factory.mktemp("predictor")
    dataset = synthetic.write_msd_brain(root / DATASET, 3, shape=(16, 20, 18))
    work = root / "work"
    plan_dataset(
        dataset_dir=dataset, workdir=work, configurations=["3d_fullres", "2d"], preprocess=False, show_progress=False
    )
    plan = load_plan(work / DATASET / "plans.json")
    for seed, configuration in enumerate(("3d_fullres", "2d")):
        torch.manual_seed(seed)
        network = build_network(plan.configuration(configuration), 4, plan.num_classes, deep_supervision=False)
        folder = work / DATASET / "models" / configuration / "fold_0"
        folder.mkdir(parents=True)
        save_checkpoint(folder / "checkpoint_final.pt", {"weights": network.state_dict(), "epoch": 0})
    return work


@pytest.fixture(scope="module")
def image(work) -> tuple[np.ndarray, object]:
    return read_channels([next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))])


def test_labels_and_probabilities_agree(work, image):
    predictor = Predictor.from_workdir(work, device="cpu", tta=False)
    data, geometry = image
    labels, probabilities = predictor.predict_with_probabilities(data, geometry)
    assert probabilities.dtype == np.float16 and probabilities.shape == (4, *geometry.shape)
    assert labels.shape == geometry.shape
    np.testing.assert_array_equal(predictor.predict_array(data, geometry), labels)
    painted = to_output_values(paint_labels(probabilities.astype(np.float32), geometry.shape, ()), predictor.plan)
    assert np.mean(painted == labels) > 0.999  # float16 ties aside


def test_an_ensemble_is_the_mean_of_its_members_and_the_temperature_keeps_the_labels(work, image):
    data, geometry = image
    members = [Predictor.from_workdir(work, configuration=c, device="cpu", tta=False) for c in ("3d_fullres", "2d")]
    alone = [m.predict_with_probabilities(data, geometry)[1].astype(np.float32) for m in members]
    ensemble = load_predictor(work, configurations=["3d_fullres", "2d"], device="cpu", tta=False)
    assert [m.config.name for m in ensemble.members] == ["3d_fullres", "2d"]
    labels, averaged = ensemble.predict_with_probabilities(data, geometry)
    np.testing.assert_allclose(averaged.astype(np.float32), (alone[0] + alone[1]) / 2, atol=2e-3)

    tempered = Predictor(ensemble.members, temperature=3.0)
    soft_labels, soft = tempered.predict_with_probabilities(data, geometry)
    np.testing.assert_array_equal(soft_labels, labels)
    assert soft.astype(np.float32).max(axis=0).mean() < averaged.astype(np.float32).max(axis=0).mean()
    np.testing.assert_allclose(soft.astype(np.float32).sum(axis=0), 1.0, atol=1e-2)


def test_a_configuration_named_twice_is_refused(work):
    with pytest.raises(WorkspaceError, match="listed twice"):
        load_predictor(work, configurations=["2d", "2d"], device="cpu")


def test_uncertainty_maps_report_and_overlay(work, image, tmp_path, run_cli):
    """--uncertainty: maps on the input grid in [0, 1], zero disagreement for identical folds, report.json."""
    import shutil

    from autoseg.data.qc.uncertainty import disagreement_map, entropy_map

    folder = work / DATASET / "models" / "3d_fullres"
    shutil.copytree(folder / "fold_0", folder / "fold_1")  # two identical folds: they cannot disagree
    try:
        source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
        out = tmp_path / "out"
        result = run_cli(
            "predict",
            "-w",
            work,
            "-i",
            source,
            "-o",
            out,
            "-c",
            "3d_fullres",
            "--uncertainty",
            "--no-tta",
            "--device",
            "cpu",
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
    finally:
        shutil.rmtree(folder / "fold_1")
    case = source.name.removesuffix(".nii.gz")
    entropy = nib.load(out / f"{case}_entropy.nii.gz")
    assert entropy.shape == nib.load(out / f"{case}.nii.gz").shape
    np.testing.assert_allclose(entropy.affine, nib.load(source).affine, atol=1e-5)
    values = np.asarray(entropy.dataobj)
    assert 0 <= values.min() and values.max() <= 1 and values.max() > 0
    assert np.abs(np.asarray(nib.load(out / f"{case}_disagreement.nii.gz").dataobj)).max() < 1e-3
    report = json.loads((out / "report.json").read_text())
    structures = report["cases"][case]["structures"]
    assert set(structures) == {"edema", "non-enhancing tumour", "enhancing tumour"}
    assert all(0 <= s["estimated_dice"] <= 1 for s in structures.values())

    shown = run_cli(
        "show",
        source,
        "--pred",
        out / f"{case}.nii.gz",
        "--overlay",
        out / f"{case}_entropy.nii.gz",
        "-o",
        tmp_path / "overlay.png",
    )
    assert shown.exit_code == 0 and (tmp_path / "overlay.png").stat().st_size > 0, shown.output

    # disagreement: two sure folds that disagree everywhere give the maximum, agreeing ones zero
    sure = np.zeros((2, 4, 4, 4), np.float32)
    sure[0] = 1
    other = sure[::-1].copy()
    assert disagreement_map([sure, other], regions=False) == pytest.approx(1.0, abs=1e-3)
    assert disagreement_map([sure, sure], regions=False) == pytest.approx(0.0, abs=1e-3)
    assert entropy_map(np.full((2, 4, 4, 4), 0.5, np.float32), regions=False) == pytest.approx(1.0, abs=1e-3)


def test_mirror_axes_and_adaptive_tta_are_recorded_with_the_passes_in_report_json(work, tmp_path, run_cli):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    case = source.name.removesuffix(".nii.gz")
    reports = {}
    for name, options in {"all": (), "two": ("--mirror-axes", "0", "2"), "adaptive": ("--adaptive-tta", "0.9")}.items():
        result = run_cli(
            "predict",
            "-w",
            work,
            "-i",
            source,
            "-o",
            tmp_path / name,
            "-c",
            "3d_fullres",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--no-progress",
            *options,
        )
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    settings = {name: report["settings"] for name, report in reports.items()}
    assert settings["all"] == {
        "backend": "torch",
        "precision": "fp32",
        "step": 0.5,
        "mirror_axes": [0, 1, 2],
        "adaptive_tta": None,
        "compiled": False,
    }
    assert settings["two"]["mirror_axes"] == [0, 2] and settings["adaptive"]["adaptive_tta"] == 0.9
    passes = {name: report["cases"][case]["passes"] for name, report in reports.items()}
    tiles = passes["all"]["tiles"]
    assert passes["all"] == {"run": 8 * tiles, "skipped": 0, "tiles": tiles, "mirrored_tiles": tiles}
    assert passes["two"] == {"run": 4 * tiles, "skipped": 0, "tiles": tiles, "mirrored_tiles": tiles}
    assert passes["adaptive"]["run"] + passes["adaptive"]["skipped"] == 8 * tiles


@pytest.mark.parametrize("configuration, axes", [("3d_fullres", [3]), ("3d_fullres", [0, 0]), ("2d", [2])])
def test_mirror_axes_the_network_does_not_have_are_refused(work, configuration, axes):
    with pytest.raises(WorkspaceError, match="--mirror-axes"):
        Predictor.from_workdir(work, configuration=configuration, device="cpu", mirror_axes=axes)


@pytest.mark.parametrize(
    "options, exit_code, message",
    [
        (("--mirror-axes", "3"), 1, "--mirror-axes 3: give distinct axes"),
        (("--mirror-axes", "x"), 2, "'x' is not an axis"),
        (("--mirror-axes", "0", "--no-tta"), 2, "--no-tta turns off"),
        (("--adaptive-tta", "0.9", "--fast"), 2, "--fast turns off"),
        (("--adaptive-tta", "1.5"), 2, "1.5 is not a confidence"),
        (("--adaptive-tta", "0.5"), 2, "0.5 is not a confidence"),
    ],
)
def test_bad_tta_options_are_refused_in_one_line_before_any_case(work, tmp_path, run_cli, options, exit_code, message):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    result = run_cli(
        "predict", "-w", work, "-i", source, "-o", tmp_path / "out", "-c", "3d_fullres", "--device", "cpu", *options
    )
    assert result.exit_code == exit_code, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def _tiny_network(work: Path) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    plan = load_plan(work / DATASET / "plans.json")
    config = plan.configuration("3d_fullres")
    torch.manual_seed(1)
    network = build_network(config, 4, plan.num_classes, deep_supervision=False).eval()
    return network, tuple(config.patch_size), plan.num_classes


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_network_predicts_what_the_eager_one_does(work, dtype):
    network, patch, classes = _tiny_network(work)
    compiled = CompiledNetwork(network, torch.zeros(1, 4, *patch), dtype, "tiny")
    image = torch.randn(4, *(p + p // 2 for p in patch))  # several tiles
    settings = WindowSettings(patch=patch, mirror_axes=(0, 1, 2), autocast_dtype=dtype, max_batch=3)
    eager = predict_probabilities([network], image, classes, settings)
    fast = predict_probabilities([compiled], image, classes, settings)  # batches of 3, 3, 2: tile by tile
    tolerance = 1e-4 if dtype is None else 0.05  # bf16: the fused kernels round differently
    assert torch.allclose(fast, eager, atol=tolerance), (fast - eager).abs().max()


def _failing_compile(*args, **kwargs):
    def fail(*_):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    return fail


def test_a_compiler_failure_is_refused_in_one_line(work, monkeypatch):
    network, patch, _ = _tiny_network(work)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with pytest.raises(
        WorkspaceError,
        match=r"--compile: compiling model 1 of 1 failed \(InvalidCxxCompiler: No "
        r"working C\+\+ compiler found\); predict without --compile$",
    ):
        CompiledNetwork(network, torch.zeros(1, 4, *patch), None, "model 1 of 1")


def test_predict_compile_writes_the_eager_masks_and_says_so_in_report_json(work, tmp_path, run_cli):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    for mode, options in (("on", ["--compile"]), ("off", [])):
        result = run_cli(
            "predict",
            "-w",
            work,
            "-i",
            source,
            "-o",
            tmp_path / mode,
            "-c",
            "3d_fullres",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            *options,
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / mode / "report.json").read_text())
        assert report["settings"]["compiled"] is (mode == "on")
    on, off = (np.asarray(nib.load(tmp_path / m / source.name).dataobj) for m in ("on", "off"))
    assert (on == off).mean() >= 0.9999


def test_compile_with_another_backend_is_refused_in_one_line_before_any_case(work, tmp_path, run_cli):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    result = run_cli(
        "predict",
        "-w",
        work,
        "-i",
        source,
        "-o",
        tmp_path / "out",
        "-c",
        "3d_fullres",
        "--device",
        "cpu",
        "--compile",
        "--backend",
        "onnxruntime",
    )
    assert result.exit_code == 1, result.output
    assert "--backend onnxruntime has its own compiler: drop --compile" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
