"""Fold networks as ONNX models, for runtimes outside torch (ONNX Runtime, OpenVINO, TensorRT, Triton).

One model per fold: the inference network (full-resolution logits only; the deep-supervision
heads are not built), input ``tiles`` ``(N, C, *patch)`` float32 with a dynamic batch axis N,
output ``logits`` ``(N, K, *patch)``. The activation (softmax or sigmoid), mirroring and
ensembling stay outside the graph, as described by the deployment spec
(:mod:`autoseg.deploy.spec`).

torch's exporter: ``torch.onnx.export(dynamo=True)`` (torch.export based, needs ``onnxscript``).
The TorchScript exporter (``dynamo=False``) still works in torch 2.14 but warns that it will be
removed, so it is not used.

Each model carries the digest of the weights it was exported from (metadata
``autoseg.weights_digest``): a predictor reuses a stored ONNX file only when the digest matches
the checkpoint beside it, so a stale file is never run silently.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Mapping
from types import ModuleType

import torch

from autoseg.core.errors import MissingExtraError
from autoseg.core.plan import Configuration
from autoseg.core.version import __version__
from autoseg.model.network import build_network

log = logging.getLogger(__name__)
ONNX_OPSET = 18
INPUT_NAME = "tiles"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
DIGEST_KEY = "autoseg.weights_digest"
#: python module -> the autoseg extra that installs it.
EXTRA_OF = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "openvino": "openvino"}


def import_extra(module: str, purpose: str) -> ModuleType:
    """Import an optional package, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA_OF[module]
        raise MissingExtraError(
            f"{purpose} needs the {module} package, which is not installed: pip install autoseg[{extra}]"
        ) from None


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict's names, dtypes, shapes and values (what an ONNX file was exported from)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_onnx(
    weights: Mapping[str, torch.Tensor], config: Configuration, in_channels: int, num_classes: int
) -> bytes:
    """The fold's inference network as a checked ONNX model (serialised bytes)."""
    from autoseg.core.checkpoint import load_weights

    import_extra("onnxscript", "ONNX export")
    onnx = import_extra("onnx", "ONNX export")
    network = build_network(config, in_channels, num_classes, deep_supervision=False)
    load_weights(network, dict(weights), f"{config.name} weights for ONNX export")
    network.eval()
    example = torch.zeros((2, in_channels, *config.patch_size))  # batch 2: the batch axis cannot be taken for 1
    program = torch.onnx.export(
        network,
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},),
        verbose=False,
    )
    model = program.model_proto
    for key, value in {
        DIGEST_KEY: weights_digest(weights),
        "autoseg.version": __version__,
        "autoseg.configuration": config.name,
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def stored_digest(model: bytes) -> str | None:
    """The weights digest recorded in an ONNX model written by :func:`export_onnx` (None if absent)."""
    onnx = import_extra("onnx", "reading an ONNX model")
    proto = onnx.load_model_from_string(model)
    return next((p.value for p in proto.metadata_props if p.key == DIGEST_KEY), None)


def importable(module: str) -> bool:
    """Installed and not blocked (``sys.modules[name] = None`` is Python's way of blocking an import)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def onnx_export_available(required: bool) -> bool:
    """Whether ONNX export can run here; ``required`` turns a missing package into the one-line error."""
    if required:
        for module in ("onnx", "onnxscript"):
            import_extra(module, "ONNX export")
        return True
    return all(importable(module) for module in ("onnx", "onnxscript"))
