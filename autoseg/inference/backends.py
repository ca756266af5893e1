"""Prediction backends: what turns a batch of preprocessed tiles into logits.

A backend model is any callable ``model(tiles) -> logits`` taking a float32 torch tensor
``(N, C, *patch)`` and returning ``(N, K, *patch)``; the sliding window
(:func:`autoseg.inference.sliding_window.predict_probabilities`) calls it exactly like a torch
module, so TTA, Gaussian blending, ensembling and export are the same code for every backend.

* ``torch``: the network itself (AMP/bf16 as ``--precision`` says).
* ``onnxruntime``: an ``InferenceSession`` on the fold's ONNX model: the CPU execution provider,
  or on ``--device cuda`` TensorRT and CUDA when this onnxruntime has them (fp32).
* ``openvino``: the ONNX model compiled for the CPU by OpenVINO, in fp32 unless ``--precision``
  resolves to bf16 (OpenVINO would otherwise pick bf16 by itself on CPUs that have it, which
  changes a few boundary voxels: bf16 is chosen by the same rule as torch's, never silently).
* ``auto`` (``predict``'s default, :func:`auto_backend`): torch on CUDA; on a CPU openvino where it is
  installed and ``autoseg select``'s check accepted it for the model (inference.json's ``openvino``
  entry, :mod:`autoseg.selection.precision`), else torch. The INT8 models of ``--precision int8`` run in
  openvino, else onnxruntime, whichever is installed (``export --int8`` checked them).

``--precision int8`` runs the fold's INT8 model, which ``autoseg export --int8`` packs only where
its Dice check accepted it (:mod:`autoseg.deploy.int8`): in OpenVINO (the runtime the check
uses, and the faster one: benchmarks/bench_int8.py), or in onnxruntime (slower than OpenVINO's
INT8 and bf16); torch has no INT8 path. onnxruntime otherwise runs fp32 only; both honour torch's thread
count (``--threads``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Configuration
from autoseg.core.processes import keep_signal_stack
from autoseg.inference.onnx_export import (
    INPUT_NAME,
    export_onnx,
    import_extra,
    importable,
    stored_digest,
    weights_digest,
)

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
TileModel = Callable[[torch.Tensor], torch.Tensor]
#: packages a backend needs, ONNX export included (a work folder's folds are exported on the fly).
_NEEDS = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "onnx", "onnxscript")}
#: the ``--precision`` values each ONNX backend takes (``auto``: bf16 where the torch backend would take it).
_PRECISIONS = {"onnxruntime": ("auto", "fp32", "int8"), "openvino": ("auto", "fp32", "bf16", "int8")}
#: the order ``auto`` tries on a CPU for INT8 models.
_CPU_PREFERENCE = ("openvino", "onnxruntime")
#: a fold's accepted INT8 model (``export --int8``) beside its checkpoint
INT8_SUFFIX = ".int8.onnx"


def _installed(backend: str) -> bool:
    return all(importable(module) for module in _NEEDS[backend])


def auto_backend(
    device: torch.device, precision: str = "auto", openvino_accepted: bool = False, torch_compile: bool = False
) -> tuple[str, str]:
    """What ``--backend auto`` runs on ``device``, and why (the line ``predict`` logs).

    ``openvino_accepted``: ``autoseg select`` found OpenVINO's classes equal torch's on the folds predicted
    (:attr:`autoseg.inference.choice.ModelChoice.openvino_accepted`); without it OpenVINO is never chosen for
    fp32 or bf16, so a model ``select`` did not check predicts with torch as before. ``--compile`` is torch's.
    """
    if device.type != "cpu":
        return "torch", f"on {device.type}"
    if precision == "int8":
        name = next((b for b in _CPU_PREFERENCE if _installed(b)), "torch")
        return name, "INT8 models run in openvino, else onnxruntime, as installed"
    if torch_compile or precision not in _PRECISIONS["openvino"]:
        return "torch", "--compile compiles torch's network" if torch_compile else f"openvino has no {precision}"
    if not openvino_accepted:
        return "torch", "no `autoseg select` check accepted openvino for these models"
    if not _installed("openvino"):
        return "torch", "`autoseg select` accepted openvino for these models, but it is not installed"
    return "openvino", "installed, and `autoseg select` found its classes equal torch's on these models"


def resolve_backend(
    name: str,
    device: torch.device,
    precision: str = "auto",
    *,
    openvino_accepted: bool = False,
    torch_compile: bool = False,
) -> str:
    """The concrete backend for ``--backend name`` on ``device``; unusable combinations are refused by name.
    ``auto`` is resolved by :func:`auto_backend` with the other arguments, and logged with its reason."""
    if name not in BACKENDS:
        raise WorkspaceError(f"unknown backend {name!r}; choose {', '.join(BACKENDS)}")
    if name == "auto":
        name, why = auto_backend(device, precision, openvino_accepted, torch_compile)
        log.info("backend auto: %s (%s)", name, why)
    if name == "torch" and precision == "int8":
        raise WorkspaceError(
            "--precision int8 runs the INT8 models of `autoseg export --int8` with --backend "
            "openvino (or onnxruntime); torch has no INT8 path"
        )
    if name == "torch":
        return name
    if precision not in _PRECISIONS[name]:
        raise WorkspaceError(
            f"--backend {name} runs {' or '.join(_PRECISIONS[name][1:])} only; drop --precision "
            f"{precision} or use --backend torch"
        )
    if name == "onnxruntime" and precision == "int8":
        log.warning(
            "--precision int8 with --backend onnxruntime: correct, but --backend openvino runs INT8 "
            "faster (and is what the INT8 check measured)"
        )
    if name == "openvino" and device.type != "cpu":
        raise WorkspaceError(f"--backend openvino runs on the CPU; use --device cpu (not {device.type})")
    if device.type not in ("cpu", "cuda"):
        raise WorkspaceError(f"--backend {name} runs on cpu or cuda, not {device.type}")
    for module in _NEEDS[name]:
        import_extra(module, f"--backend {name}")
    return name


def int8_path(checkpoint: Path) -> Path:
    """``.../checkpoint_final.pt`` -> ``.../checkpoint_final.int8.onnx``."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".pt") + INT8_SUFFIX)


class OnnxRuntimeModel:
    """An ONNX Runtime session callable like the torch network."""

    def __init__(self, model: bytes, device: torch.device) -> None:
        ort = import_extra("onnxruntime", "--backend onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            available = ort.get_available_providers()
            gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            if not gpu:
                raise WorkspaceError(
                    "this onnxruntime has no CUDA execution provider (install onnxruntime-gpu) "
                    "; or predict with --device cpu"
                )
            providers = gpu + providers
        self.session = ort.InferenceSession(model, options, providers=providers)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(tiles.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {INPUT_NAME: array})[0]).to(tiles.device)


class OpenVinoModel:
    """An OpenVINO model compiled for the CPU in fp32 or (``bf16``) bf16, callable like the torch network."""

    def __init__(self, model: bytes, bf16: bool = False) -> None:
        ov = import_extra("openvino", "--backend openvino")
        core = ov.Core()
        with keep_signal_stack():  # OpenVINO's own would dangle once the model is freed
            self.compiled = core.compile_model(
                core.read_model(model=model),
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                    "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                },
            )

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(tiles.detach().cpu().numpy(), dtype=np.float32)
        with keep_signal_stack():
            return torch.from_numpy(np.array(self.compiled(array)[0])).to(tiles.device)


def onnx_model(
    weights: Mapping[str, torch.Tensor],
    config: Configuration,
    in_channels: int,
    num_classes: int,
    stored: bytes | None,
    source: str,
) -> bytes:
    """The ONNX model for these weights: ``stored`` (an exported file) when it was made from them, else
    exported now in memory."""
    if stored is not None:
        if stored_digest(stored) == weights_digest(weights):
            return stored
        log.warning("%s: its ONNX file was not exported from these weights; exporting again", source)
    log.info("%s: exporting to ONNX in memory", source)
    return export_onnx(weights, config, in_channels, num_classes)


def backend_model(backend: str, model: bytes, device: torch.device, bf16: bool = False) -> TileModel:
    """Wrap an ONNX model for ``backend`` (onnxruntime, or openvino in fp32 or ``bf16``)."""
    return OnnxRuntimeModel(model, device) if backend == "onnxruntime" else OpenVinoModel(model, bf16)
