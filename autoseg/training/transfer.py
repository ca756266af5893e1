"""Start a network from another model's weights when the two do not match exactly.

nnU-Net loads pretrained weights only into an identical network. Here every weight whose
name and shape match is loaded; the input layer is adapted when the channels differ
(matched by name: a channel both have keeps its filters, a new channel starts from the mean
of the source's filters, a channel the new data lack is dropped); the segmentation heads
start fresh when the classes differ. Anything else that does not fit (another topology) is
refused: plan the new dataset with ``autoseg plan --like`` so that the topologies agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from autoseg.core.errors import CheckpointError
from autoseg.core.plan import channel_key

INPUT_LAYER = "encoder.0.0.0.weight"
HEADS = "heads."


@dataclass(frozen=True)
class Pretrained:
    """A source model: its weights (state dict), channel names and class names, and where it came from."""

    weights: dict[str, torch.Tensor]
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    source: str


@dataclass
class TransferReport:
    """What happened to each weight tensor of the new network, for the user and the log."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"loaded": len(self.loaded), "adapted": self.adapted, "reinitialised": self.reinitialised,
                "notes": self.notes}


def transfer_weights(network: torch.nn.Module, source: dict[str, torch.Tensor], source_channels: Sequence[str],
                     source_classes: Sequence[str], channels: Sequence[str], classes: Sequence[str],
                     source_name: str) -> TransferReport:
    """Load what fits of ``source`` (a state dict) into ``network``, adapting the input layer and heads."""
    report = TransferReport()
    state = network.state_dict()
    same_classes = list(source_classes) == list(classes)
    unmatched = []
    for name, target in state.items():
        weight = source.get(name)
        if name.startswith(HEADS) and not same_classes:
            report.reinitialised.append(name)
        elif name == INPUT_LAYER and weight is not None and list(source_channels) != list(channels):
            state[name] = _adapt_input_layer(weight, source_channels, channels, report)
            report.adapted.append(name)
        elif weight is not None and weight.shape == target.shape:
            state[name] = weight.to(target.dtype)
            report.loaded.append(name)
        else:
            unmatched.append(f"{name} {tuple(target.shape)} vs {tuple(weight.shape) if weight is not None else 'absent'}")
    if unmatched:
        raise CheckpointError(f"{source_name}: {len(unmatched)} weight(s) do not fit this network, e.g. {unmatched[0]}; "
                              "the topologies differ: plan this dataset with `autoseg plan --like` that model")
    if not same_classes:
        report.notes.append(f"segmentation heads start fresh: classes {list(classes)} differ from the source's "
                            f"{list(source_classes)}")
    network.load_state_dict(state)
    return report


def _adapt_input_layer(weight: torch.Tensor, source_channels: Sequence[str], channels: Sequence[str],
                       report: TransferReport) -> torch.Tensor:
    """First convolution ``(F, C, *k)`` rebuilt for ``channels``: by name, new ones from the mean."""
    by_key = {channel_key(n): i for i, n in enumerate(source_channels)}
    mean = weight.mean(dim=1)
    columns = []
    for name in channels:
        index = by_key.get(channel_key(name))
        if index is None:
            report.notes.append(f"new channel {name!r}: its input filters start from the mean of the source's "
                                f"{len(source_channels)} channels")
        columns.append(weight[:, index] if index is not None else mean)
    kept = {channel_key(n) for n in channels}
    dropped = [n for n in source_channels if channel_key(n) not in kept]
    if dropped:
        report.notes.append(f"source channel(s) {dropped} are not in this dataset: their input filters are dropped")
    return torch.stack(columns, dim=1).contiguous()
