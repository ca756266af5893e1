"""torch.compile for the torch backend (``predict --compile``): compiled prediction equals eager's, and a
compiler failure or a backend that is not torch is refused in one line."""

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
from autoseg.data import synthetic
from autoseg.inference.compiled import CompiledNetwork
from autoseg.inference.sliding_window import WindowSettings, predict_probabilities
from autoseg.model.network import build_network

DATASET = "Task01_BrainTumour"


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
    with pytest.raises(WorkspaceError, match=r"--compile: compiling model 1 of 1 failed \(InvalidCxxCompiler: No "
                                             r"working C\+\+ compiler found\); predict without --compile$"):
        CompiledNetwork(network, torch.zeros(1, 4, *patch), None, "model 1 of 1")


def test_predict_compile_writes_the_eager_masks_and_says_so_in_report_json(work, tmp_path, run_cli):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    for mode, options in (("on", ["--compile"]), ("off", [])):
        result = run_cli("predict", "-w", work, "-i", source, "-o", tmp_path / mode, "--device", "cpu",
                         "--precision", "fp32", *options, "--no-progress")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / mode / "report.json").read_text())
        assert report["settings"]["compiled"] is (mode == "on")
    on, off = (np.asarray(nib.load(tmp_path / m / source.name).dataobj) for m in ("on", "off"))
    assert (on == off).mean() >= 0.9999


def test_compile_with_another_backend_is_refused_in_one_line_before_any_case(work, tmp_path, run_cli):
    source = next((work.parent / DATASET / "imagesTr").glob("*.nii.gz"))
    result = run_cli("predict", "-w", work, "-i", source, "-o", tmp_path / "out", "--device", "cpu", "--compile",
                     "--backend", "onnxruntime")
    assert result.exit_code == 1, result.output
    assert "--backend onnxruntime has its own compiler: drop --compile" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
