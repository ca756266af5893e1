"""Multi-process training with DDP, launched by ``torchrun`` (single- or multi-node).

torchrun's rendezvous sets up the process group (NCCL on CUDA, gloo on CPU); each rank
uses the GPU of its local rank. Outside torchrun everything runs as rank 0 of 1. When a
rank dies, torchrun (``--max-restarts``) stops the others and starts the whole group
again; the restarted ranks continue from ``checkpoint_latest.pt``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autoseg.core.errors import AutosegError, PlanError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join the torchrun process group if launched by torchrun; otherwise a single process."""
    if not dist.is_available() or not dist.is_torchelastic_launched():
        return DistributedContext()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        store = _attempt_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(
                backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
            )
    local_rank = dist.get_node_local_rank(fallback_rank=0)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


def _attempt_store() -> dist.Store | None:
    """The process group's store, private to this restart of the group; None to let torch choose.

    torchrun's agent hosts one store for all restarts of a job (pytorch#135712): a restarted
    group can read the connection keys of the group it replaces and try to reach a dead
    process ("Gloo connectFullMesh failed ... Connection refused"). On one node all ranks
    share one agent and so one restart count, which names a fresh namespace per attempt.
    Across nodes the agents count restarts separately; there torchrun must be launched with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a new store each round), which docs/training.md says.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None  # a new store for every round already
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
            log.warning(
                "torchrun shares one store across restarts: with several nodes a restarted group may fail "
                "to connect; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/training.md)"
            )
        return None
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"autoseg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_elastic_restart() -> bool:
    """True in a group that torchrun started again after one of its processes failed.

    torchrun counts its restarts in ``TORCHELASTIC_RESTART_COUNT``. A restarted group must
    continue from its checkpoint even if the first launch said ``--no-resume``, or every
    restart would throw the finished epochs away.
    """
    return dist.is_torchelastic_launched() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def split_batch(global_batch: int, context: DistributedContext) -> tuple[int, int]:
    """(start, size) of this rank's share of the global batch; every rank gets at least one sample."""
    if global_batch < context.world_size:
        raise PlanError(
            f"batch size {global_batch} is smaller than the {context.world_size} processes; "
            "use fewer processes or a plan configuration with a larger batch"
        )
    base, extra = divmod(global_batch, context.world_size)
    size = base + (1 if context.rank < extra else 0)
    start = context.rank * base + min(context.rank, extra)
    return start, size


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.enabled:
        dist.all_reduce(tensor)
    return tensor


#: a wait for rank 0's validation: this long at least, plus :data:`WAIT_PER_PASS_S` per network pass it runs
MIN_WAIT_S = 600.0
WAIT_PER_PASS_S = 2.0


def validation_wait_s(forward_passes: int) -> float:
    """How long the other ranks wait for rank 0's validation before they give up with a message: generous
    (a CPU runs a sliding-window pass in well under 2 s), and bounded, unlike NCCL's watchdog kill."""
    return MIN_WAIT_S + WAIT_PER_PASS_S * forward_passes


@dataclass(frozen=True)
class MainWait:
    """A gloo group in which the other ranks wait for rank 0's single-rank work (validation during training)
    with a timeout of their own: NCCL's barrier takes none, and its watchdog kills a rank that waits long."""

    group: dist.ProcessGroup
    timeout_s: float


def main_wait(context: DistributedContext, timeout_s: float) -> MainWait | None:
    """Create the waiting group (every rank calls this together); None for a single process."""
    if not context.enabled:
        return None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return MainWait(group, timeout_s)


def wait_for_main(context: DistributedContext, wait: MainWait | None, what: str) -> None:
    """Every rank meets here; rank 0 arrives once it has done ``what``. A rank that waits longer than the
    bound ends with one line naming it, instead of hanging in the next collective."""
    if wait is None or not context.enabled:
        return
    try:
        dist.barrier(group=wait.group)
    except RuntimeError as exc:
        raise AutosegError(
            f"rank {context.rank} waited more than {wait.timeout_s:.0f} s for rank 0 to finish {what}; "
            "rank 0 is stuck or far slower than expected (see its log). --val-every 0 trains without "
            "validation during training"
        ) from exc


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
