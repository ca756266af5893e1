"""torch.compile for the torch backend: when ``--compile auto`` compiles, that compiled prediction equals
eager's, and that a compiler failure falls back to eager (auto) or is refused in one line (on)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import save_checkpoint
from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import load_plan
from autoseg.data import synthetic
from autoseg.inference.compiled import COMPILE_MIN_WORK, CompiledNetwork, should_compile
from autoseg.inference.sliding_window import WindowSettings, predict_probabilities
from autoseg.model.network import build_network

DATASET = "Task01_BrainTumour"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work folder with one random-weight fold of a tiny 3d_fullres network."""
    root = tmp_path_factory.mktemp("compiled")
    dataset = synthetic.write_msd_brain(root / DATASET, 2, shape=(16, 20, 18))
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], preprocess=False,
                 show_progress=False)
    plan = load_plan(work / DATASET / "plans.json")
    torch.manual_seed(0)
    network = build_network(plan.configuration("3d_fullres"), 4, plan.num_classes, deep_supervision=False)
    folder = work / DATASET / "models" / "3d_fullres" / "fold_0"
    folder.mkdir(parents=True)
    save_checkpoint(folder / "checkpoint_final.pt", {"weights": network.state_dict(), "epoch": 0})
    return work


def test_auto_compiles_large_fp32_networks_on_a_cpu_only():
    task01 = load_plan(REPO / "plans" / "Task01_BrainTumour" / "plans.json").configuration("3d_fullres")
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert task01.network.features_per_stage[0] * np.prod(task01.patch_size) >= COMPILE_MIN_WORK
    assert should_compile("auto", task01, cpu, "torch", None)
    assert not should_compile("auto", task01, cpu, "torch", bf16)  # measured 1.02x: not worth compiling
    assert not should_compile("auto", task01, cuda, "torch", None)  # unmeasured on GPUs: eager unless asked
    assert not should_compile("auto", task01, cpu, "openvino", None)
    assert not should_compile("off", task01, cpu, "torch", None) and should_compile("on", task01, cuda, "torch", bf16)
    with pytest.raises(WorkspaceError, match="--backend openvino has its own compiler"):
        should_compile("on", task01, cpu, "openvino", None)
    with pytest.raises(WorkspaceError, match="--compile maybe: choose auto, on, off"):
        should_compile("maybe", task01, cpu, "torch", None)


def _tiny_network(work: Path) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    plan = load_plan(work / DATASET / "plans.json")
    config = plan.configuration("3d_fullres")
    torch.manual_seed(1)
    network = build_network(config, 4, plan.num_classes, deep_supervision=False).eval()
    return network, tuple(config.patch_size), plan.num_classes


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_network_predicts_what_the_eager_one_does(work, dtype):
    network, patch, classes = _tiny_network(work)
    compiled = CompiledNetwork(network, torch.zeros(1, 4, *patch), dtype, "tiny", required=True)
    assert compiled.compiled
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


def test_a_compiler_failure_runs_eager_with_a_warning_or_is_refused_with_on(work, monkeypatch, caplog):
    network, patch, _ = _tiny_network(work)
    monkeypatch.setattr(torch, "compile", _failing_compile)
    with caplog.at_level(logging.WARNING):
        fallback = CompiledNetwork(network, torch.zeros(1, 4, *patch), None, "model 1 of 1", required=False)
    assert not fallback.compiled
    assert "could not compile model 1 of 1 (InvalidCxxCompiler: No working C++ compiler found)" in caplog.text
    tiles = torch.randn(2, 4, *patch)
    with torch.inference_mode():
        assert torch.equal(fallback(tiles), network(tiles))
    with pytest.raises(WorkspaceError, match=r"--compile on: compiling model 1 of 1 failed \(InvalidCxxCompiler"):
        CompiledNetwork(network, torch.zeros(1, 4, *patch), None, "model 1 of 1", required=True)


def test_predict_compile_on_writes_the_eager_masks_and_says_so_in_report_json(work, tmp_path, run_cli):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    for mode in ("on", "off"):
        result = run_cli("predict", "-w", work, "-i", source, "-o", tmp_path / mode, "--device", "cpu",
                         "--precision", "fp32", "--compile", mode, "--no-progress")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / mode / "report.json").read_text())
        assert report["settings"]["compiled"] is (mode == "on")
    on, off = (np.asarray(nib.load(tmp_path / m / source.name).dataobj) for m in ("on", "off"))
    assert (on == off).mean() >= 0.9999


@pytest.mark.parametrize("options, message", [
    (("--compile", "maybe"), "--compile maybe: choose auto, on, off"),
    (("--compile", "on", "--backend", "onnxruntime"), "--backend onnxruntime has its own compiler"),
])
def test_bad_compile_options_are_refused_in_one_line_before_any_case(work, tmp_path, run_cli, options, message):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    result = run_cli("predict", "-w", work, "-i", source, "-o", tmp_path / "out", "--device", "cpu", *options)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
