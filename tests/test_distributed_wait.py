"""Under DDP only rank 0 validates during training; the other ranks wait for it with a bound and a message
(NCCL's barrier has no timeout, and its watchdog kills a rank that waits long). Two gloo processes on CPU."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from autoseg.core.errors import AutosegError
from autoseg.training.distributed import DistributedContext, main_wait, validation_wait_s, wait_for_main


def _rank(rank: int, store: str, main_busy_s: float, timeout_s: float, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    context = DistributedContext(rank, 2, rank)
    wait = main_wait(context, timeout_s)
    try:
        if rank == 0:
            time.sleep(main_busy_s)  # rank 0 validates
        wait_for_main(context, wait, "validating epoch 9")
        results.put((rank, "ok"))
    except AutosegError as exc:
        results.put((rank, str(exc)))
    if rank == 0 or main_busy_s < timeout_s:
        dist.destroy_process_group()


def _run(tmp_path: Path, main_busy_s: float, timeout_s: float) -> dict[int, str]:
    tmp_path.mkdir(parents=True)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [
        context.Process(target=_rank, args=(rank, tmp_path / "store", main_busy_s, timeout_s, results))
        for rank in (0, 1)
    ]
    for process in ranks:
        process.start()
    try:
        got = dict(results.get(timeout=60) for _ in ranks)
    finally:
        for process in ranks:
            process.join(30)
            if process.is_alive():
                process.kill()
    return got


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_the_other_ranks_wait_for_rank_0s_validation_with_a_bound(tmp_path):
    assert _run(tmp_path / "in_time", main_busy_s=1.0, timeout_s=30) == {0: "ok", 1: "ok"}
    late = _run(tmp_path / "late", main_busy_s=6.0, timeout_s=2)
    assert late[1].startswith("rank 1 waited more than 2 s for rank 0 to finish validating epoch 9;"), late
    assert "--val-every 0" in late[1]


def test_the_bound_grows_with_the_validation():
    assert validation_wait_s(0) >= 600 and validation_wait_s(10_000) > validation_wait_s(100)
