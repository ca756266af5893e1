"""The composed predictor on random weights (fast): the API's outputs agree with each other, the
ensemble is the mean of its members on the input grid, the temperature changes no label, the TTA
options, and ``--compile`` (torch.compile) predicts what eager torch does or is refused in one line."""

from __future__ import annotations

import json
import shutil
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

#: torch.compile builds C++ kernels on the CPU: without a compiler these tests cannot run (CI installs g++)
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile builds C++ kernels and no C++ compiler (g++, c++ or clang++) is on PATH",
)


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


def test_asking_for_the_uncertainty_never_changes_the_mask(work, image):
    """labels_and_uncertainty runs every fold apart: its labels must still be labels_and_probabilities's, for
    one configuration with two different folds and for an ensemble of configurations."""
    data, geometry = image
    plan = load_plan(work / DATASET / "plans.json")
    torch.manual_seed(7)
    network = build_network(plan.configuration("3d_fullres"), 4, plan.num_classes, deep_supervision=False)
    second = work / DATASET / "models" / "3d_fullres" / "fold_1"
    save_checkpoint(second / "checkpoint_final.pt", {"weights": network.state_dict(), "epoch": 0})
    try:
        for predictor in (
            Predictor.from_workdir(work, configuration="3d_fullres", device="cpu", tta=False),
            load_predictor(work, configurations=["3d_fullres", "2d"], device="cpu", tta=False),
        ):
            labels, uncertainty = predictor.labels_and_uncertainty(np.array(data), geometry)
            np.testing.assert_array_equal(labels, predictor.predict_labels(data, geometry))
            assert uncertainty.disagreement.max() > 0  # the folds differ: the test is not trivial
    finally:
        shutil.rmtree(second)


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


@needs_cxx
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


@needs_cxx
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


def test_a_rerun_that_asks_for_more_outputs_predicts_the_cases_again(work, tmp_path, run_cli):
    """A case is done only when every requested output exists: masks from a first run do not make a rerun
    with --save-probabilities, --uncertainty or --statistics skip the case."""
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    case = source.name.removesuffix(".nii.gz")
    out = tmp_path / "out"
    common = ["predict", "-w", work, "-i", source, "-o", out, "-c", "3d_fullres", "--no-tta", "--device", "cpu"]
    first = run_cli(*common, "--no-progress")
    assert first.exit_code == 0 and "1 written, 0 skipped" in first.output, first.output
    again = run_cli(*common, "--no-progress", "--save-probabilities", "--uncertainty", "--statistics")
    assert again.exit_code == 0 and "1 written, 0 skipped" in again.output, again.output
    for name in (f"{case}.npz", f"{case}_entropy.nii.gz", f"{case}_disagreement.nii.gz"):
        assert (out / name).is_file(), name
    entry = json.loads((out / "report.json").read_text())["cases"][case]
    assert "statistics" in entry and "structures" in entry
    third = run_cli(*common, "--no-progress", "--save-probabilities", "--uncertainty", "--statistics")
    assert third.exit_code == 0 and "0 written, 1 skipped" in third.output, third.output
    (out / f"{case}.npz").unlink()  # a run killed before this case's probabilities were written
    fourth = run_cli(*common, "--no-progress", "--save-probabilities")
    assert "1 written, 0 skipped" in fourth.output and (out / f"{case}.npz").is_file(), fourth.output


def test_options_keep_what_still_applies_of_inference_json(work, tmp_path, caplog):
    """-c/-f/--checkpoint: inference.json's choices that still apply stay, the rest is dropped in one line."""
    import logging

    from autoseg.core.workspace import find_dataset
    from autoseg.data.evaluation.postprocessing import RelabelSmall, step_to_json
    from autoseg.inference.choice import choose_models

    workspace = find_dataset(work)
    plan = load_plan(workspace.plans)
    step = RelabelSmall(source=1, target=2, max_volume_mm3=10.0)
    workspace.inference.write_text(
        json.dumps(
            {
                "version": 1,
                "configurations": ["3d_fullres"],
                "folds": {"3d_fullres": [0, 1]},
                "checkpoint": "final",
                "postprocessing": [step_to_json(step)],
                "calibration": {"temperature": 1.5},
                "bf16": {"accepted": True},
                "openvino": {"accepted": True},
            }
        )
    )
    try:
        followed = choose_models(workspace, plan)
        assert followed.bf16_accepted and followed.openvino_accepted
        with caplog.at_level(logging.INFO):
            one_fold = choose_models(workspace, plan, folds=["0"])
        assert one_fold.configurations == ("3d_fullres",) and one_fold.folds == {"3d_fullres": ("0",)}
        assert one_fold.postprocessing == (step,) and one_fold.temperature == 1.5 and one_fold.bf16_accepted
        assert one_fold.openvino_accepted
        assert "kept post-processing (1), temperature 1.5, bf16 and openvino acceptance" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO):
            other_fold = choose_models(workspace, plan, folds=["2"])
        assert other_fold.postprocessing == (step,) and not other_fold.bf16_accepted
        assert not other_fold.openvino_accepted
        assert "bf16 and openvino acceptance dropped: it was checked on other folds" in caplog.text
        caplog.clear()
        for options in ({"configurations": ["2d"]}, {"checkpoint": "best"}):
            with caplog.at_level(logging.INFO):
                other = choose_models(workspace, plan, **options)
            assert other.postprocessing == () and other.temperature == 1.0 and not other.bf16_accepted
            assert not other.openvino_accepted
            assert (
                "post-processing, temperature, bf16 and openvino acceptance dropped: it was chosen for 3d_fullres"
                in (caplog.text)
            )
            caplog.clear()
    finally:
        workspace.inference.unlink()


def test_predict_runs_openvino_by_default_only_where_select_accepted_it(work, tmp_path, run_cli, monkeypatch):
    """predict's default --backend auto: torch for an inference.json without an openvino entry (written before
    the check) or with a refused one, OpenVINO on a CPU where select accepted it and it is installed; an explicit
    --backend wins, and --precision auto still takes bf16 (in OpenVINO) where its own check passed. report.json
    records what ran."""
    from autoseg.core.workspace import find_dataset
    from autoseg.inference import backends, choice

    workspace = find_dataset(work)
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))

    def write(**checks: dict) -> None:
        document = {
            "version": 1,
            "configurations": ["3d_fullres"],
            "folds": {"3d_fullres": [0]},
            "checkpoint": "final",
            "postprocessing": [],
        }
        workspace.inference.write_text(json.dumps(document | checks))

    def predict(name: str, openvino: dict | None, *options: str) -> tuple[str, str]:
        write(**({"openvino": openvino} if openvino else {}))
        out = tmp_path / name
        result = run_cli(
            "predict", "-w", work, "-i", source, "-o", out, "--no-tta", "--device", "cpu", "--no-progress", *options
        )
        assert result.exit_code == 0, result.output
        return json.loads((out / "report.json").read_text())["settings"]["backend"], " ".join(result.output.split())

    try:
        backend, output = predict("old", None)
        assert backend == "torch" and "backend auto: torch (no `autoseg select` check accepted openvino" in output
        assert predict("refused", {"accepted": False, "reason": "openvino is not installed"})[0] == "torch"
        assert predict("explicit", {"accepted": True}, "--backend", "torch")[0] == "torch"
        if backends._installed("openvino"):
            backend, output = predict("accepted", {"accepted": True, "agreement": 1.0})
            assert backend == "openvino" and output.count("backend auto: openvino") == 1, output
            masks = [np.asarray(nib.load(tmp_path / run / source.name).dataobj) for run in ("old", "accepted")]
            assert (masks[0] == masks[1]).mean() >= 0.999
            monkeypatch.setattr(choice, "cpu_has_native_bf16", lambda: True)
            write(openvino={"accepted": True}, bf16={"accepted": True})
            member = load_predictor(work, device="cpu", tta=False).members[0]
            assert member.backend == "openvino" and member.bf16  # OpenVINO compiled in bf16
        monkeypatch.setattr(backends, "_installed", lambda backend: False)
        backend, output = predict("missing", {"accepted": True})
        assert backend == "torch" and "accepted openvino for these models, but it is not installed" in output
    finally:
        workspace.inference.unlink()
