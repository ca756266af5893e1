"""An ``on_epoch_end`` hook that kills a training run after a given epoch, as a crash would (resume tests)."""

from __future__ import annotations


class Killed(Exception):
    pass


def kill_after(epoch: int):
    def hook(done: int, entry: dict) -> None:
        if done == epoch:
            raise Killed

    return hook
