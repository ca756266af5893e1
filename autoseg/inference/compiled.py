"""torch.compile for the torch backend: the same network, its fp32 passes ~1.14x faster on a CPU.

Inductor with ``freezing`` folds the weights into the graph, so oneDNN gets them prepacked in
its blocked layout and the pointwise work (instance norm, leaky ReLU) is fused. Measured on one
128^3 tile of the Task01 network on a 2-core AVX512-BF16 CPU (benchmarks/bench_int8.py): fp32
7.64 s eager, 6.69 s compiled (1.14x); bf16 3.33 s against 3.26 s (1.02x, not worth a
compilation). The price is one compilation when the folds load: ~20 s for the first fold on that
CPU, ~2 s for each further one (torch caches the kernels, on disk too). So ``auto`` compiles only
where that pays back within about one case: on a CPU, in fp32, for a network whose pass is large
(:data:`COMPILE_MIN_WORK`); small networks, which pass a tile in milliseconds, run eager. Results
equal eager's to float rounding (tested).

Compiling needs a C++ compiler at run time. When compiling fails, ``auto`` warns once and runs the
network eager (the masks are the same, only slower); ``on`` refuses in one line instead.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from autoseg.core.errors import WorkspaceError
from autoseg.core.plan import Configuration

log = logging.getLogger(__name__)
COMPILE_CHOICES = ("auto", "on", "off")
#: first-stage features x patch voxels from which ``auto`` compiles on a CPU: a quarter of the Task01
#: network's 32 x 128^3, whose eager fp32 pass takes seconds; below it a pass takes well under a second.
COMPILE_MIN_WORK = 2**24


def should_compile(choice: str, config: Configuration, device: torch.device, backend: str,
                   autocast: torch.dtype | None) -> bool:
    """Whether ``--compile choice`` compiles this configuration's network run under ``autocast`` (None: fp32);
    contradictions are refused."""
    if choice not in COMPILE_CHOICES:
        raise WorkspaceError(f"--compile {choice}: choose {', '.join(COMPILE_CHOICES)}")
    if choice == "on" and backend != "torch":
        raise WorkspaceError(f"--compile on compiles the torch backend's network; --backend {backend} has its own "
                             "compiler: drop --compile")
    if choice != "auto":
        return choice == "on"
    work = config.network.features_per_stage[0] * math.prod(config.patch_size)
    return backend == "torch" and device.type == "cpu" and autocast is None and work >= COMPILE_MIN_WORK


class CompiledNetwork:
    """A tile model (``tiles -> logits``) that runs ``network`` through torch.compile.

    It compiles when made, on an empty tile of the patch's shape under the autocast ``dtype`` the
    sliding window will use, so a failure shows before any case: ``required`` refuses in one line,
    otherwise the network runs eager. Tiles then go through one at a time, so every call has that
    one shape (a batch of mirrored copies would compile again for each batch size).
    """

    def __init__(self, network: torch.nn.Module, example: torch.Tensor, dtype: torch.dtype | None, name: str,
                 required: bool) -> None:
        self.network = network
        log.info("compiling %s for this machine (once per fold; --compile off skips it)", name)
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = torch.compile(
            network, options={"freezing": True})
        try:
            with torch.inference_mode(), torch.autocast(example.device.type, dtype=dtype, enabled=dtype is not None):
                self._compiled(example)
        except Exception as error:  # noqa: BLE001 - any compiler failure: eager gives the same masks
            text = str(error).strip()
            reason = text.splitlines()[0] if text else type(error).__name__
            if required:
                raise WorkspaceError(f"--compile on: compiling {name} failed ({reason}); use --compile off") from None
            log.warning("could not compile %s (%s); it runs uncompiled (same masks, slower)", name, reason)
            self._compiled = None

    @property
    def compiled(self) -> bool:
        """False where compiling failed and the network runs eager."""
        return self._compiled is not None

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            return self.network(tiles)
        return torch.cat([self._compiled(tiles[i:i + 1]) for i in range(len(tiles))])
