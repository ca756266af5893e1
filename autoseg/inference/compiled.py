"""torch.compile for the torch backend (``predict --compile``): the same network, ~5 % faster per case on a CPU.

Inductor with ``freezing`` folds the weights into the graph, so oneDNN gets them prepacked in
its blocked layout and the pointwise work (instance norm, leaky ReLU) is fused. Measured on the
Task01 network, one BraTS-size case with TTA on a 2-core AVX512-BF16 CPU (benchmarks/bench_predict.py):
fp32 388.6 s eager against 368.1 s compiled, bf16 199.2 s against 188.7 s, after ~13 s of
compiling at load (~2 s for each further fold: torch caches the kernels, on disk too), with
0.35 GB more peak memory (the frozen weights). Too little for a default that costs memory and a
C++ compiler at run time, so it is opt-in. Results equal eager's to float rounding (tested).
"""

from __future__ import annotations

import logging

import torch

from autoseg.core.errors import WorkspaceError

log = logging.getLogger(__name__)


class CompiledNetwork:
    """A tile model (``tiles -> logits``) that runs ``network`` through torch.compile.

    It compiles when made, on an empty tile of the patch's shape under the autocast ``dtype`` the
    sliding window will use, so a failure (e.g. no C++ compiler) is refused in one line before any
    case. Tiles then go through one at a time, so every call has that one shape (a batch of
    mirrored copies would compile again for each batch size).
    """

    def __init__(self, network: torch.nn.Module, example: torch.Tensor, dtype: torch.dtype | None, name: str) -> None:
        log.info("compiling %s for this machine (drop --compile to skip it)", name)
        self._compiled = torch.compile(network, options={"freezing": True})
        try:
            with torch.inference_mode(), torch.autocast(example.device.type, dtype=dtype, enabled=dtype is not None):
                self._compiled(example)
        except Exception as error:  # noqa: BLE001 - any compiler failure, named in one line
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            raise WorkspaceError(f"--compile: compiling {name} failed ({reason}); predict without --compile") from None

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._compiled(tiles[i : i + 1]) for i in range(len(tiles))])
