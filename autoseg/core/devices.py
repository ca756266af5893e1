"""Device and precision choice, shared by training and inference."""

from __future__ import annotations

from pathlib import Path

import torch

from autoseg.core.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; choose auto, cpu, cuda (or cuda:N) or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}; choose auto, cpu, cuda (or cuda:N) or mps")
    return device


def precision_for(device: torch.device) -> tuple[str, torch.dtype | None]:
    """bf16 autocast where the GPU supports it, else fp16 (with a grad scaler in training); fp32 elsewhere."""
    if device.type != "cuda":
        return "fp32", None
    return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: /proc/cpuinfo flags of CPUs that compute bf16 natively (elsewhere bf16 is emulated, and slower than fp32)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU runs bf16 convolutions natively (Linux; False where it cannot tell)."""
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in NATIVE_BF16_FLAGS)


def inference_autocast(device: torch.device, precision: str) -> torch.dtype | None:
    """Autocast dtype for prediction. ``auto``: the training choice (bf16/fp16 on CUDA, fp32 elsewhere;
    a CPU with native bf16 gets bf16 for a model whose ``select`` check passed, see
    :func:`autoseg.inference.choice.auto_bf16`);
    ``bf16`` also runs on CPUs (fast where they have AVX512-BF16 or AMX, slow emulation otherwise);
    ``int8`` is no autocast: the ONNX backends run a quantised model (torch refuses it)."""
    if precision == "auto":
        return precision_for(device)[1]
    if precision in ("fp32", "int8"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    if precision == "fp16":
        raise DeviceError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
