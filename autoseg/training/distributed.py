"""Multi-process training with DDP, launched by ``torchrun`` (single- or multi-node).

torchrun's rendezvous sets up the process group (NCCL on CUDA, gloo on CPU); each rank
uses the GPU of its local rank. Outside torchrun everything runs as rank 0 of 1. When a
rank dies, torchrun (``--max-restarts``) stops the others and starts the whole group
again; the restarted ranks continue from ``checkpoint_latest.pt``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autoseg.core.errors import PlanError

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


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
