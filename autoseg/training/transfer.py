"""Start a network from another model's weights when the two do not match exactly.

nnU-Net loads pretrained weights only into an identical network. Here every weight whose
name and shape match is loaded; the input layer is adapted when the channels differ
(matched by name: a channel both have keeps its filters, a new channel starts from the mean
of the source's filters, a channel the new data lack is dropped). When the classes differ, each
segmentation head (every deep-supervision output) keeps the source's row of every class of the
same name and kind (``background``, ``edema``; softmax labels only from labels, sigmoid regions
only from regions), and only the other classes start fresh: the trainer then trains the heads
alone first (``heads_first_epochs``), so that the fresh rows do not push random gradients
into the pretrained features (LP-FT, Kumar et al. 2022). A class that is a union of the source's
classes (``tumour core`` = non-enhancing + enhancing) starts fresh: label values of two datasets
say nothing about each other, so no union can be read off them. Anything else that does not fit
(another topology) is refused: plan the new dataset with ``autoseg plan --like`` so that the
topologies agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    #: whether ``classes`` are regions (sigmoid outputs) rather than labels (softmax outputs)
    regions: bool = False


@dataclass
class TransferReport:
    """What happened to each weight tensor of the new network, for the user and the log."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    #: classes whose head rows came from the source's class of the same name, and those that start fresh
    classes_copied: list[str] = field(default_factory=list)
    classes_fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "loaded": len(self.loaded),
            "adapted": self.adapted,
            "reinitialised": self.reinitialised,
            "classes_copied": self.classes_copied,
            "classes_fresh": self.classes_fresh,
            "notes": self.notes,
        }


def copied_classes(pretrained: Pretrained, classes: Sequence[str], regions: bool) -> dict[int, int]:
    """Head row of each class that takes the source's row of the same name (compared as channel names
    are: ``Edema`` = ``edema``) -> that source row; none between labels (softmax) and regions
    (sigmoid), whose outputs mean different things."""
    if pretrained.regions != regions:
        return {}
    by_key = {channel_key(n): i for i, n in enumerate(pretrained.classes)}
    return {i: by_key[channel_key(n)] for i, n in enumerate(classes) if channel_key(n) in by_key}


def fresh_classes(pretrained: Pretrained, classes: Sequence[str], regions: bool) -> list[str]:
    """The classes whose head rows start fresh (empty when the source has them all, by name and kind)."""
    copied = copied_classes(pretrained, classes, regions)
    return [n for i, n in enumerate(classes) if i not in copied]


def transfer_weights(
    network: torch.nn.Module,
    pretrained: Pretrained,
    channels: Sequence[str],
    classes: Sequence[str],
    regions: bool,
    channel_map: dict[str, str] | None = None,
) -> TransferReport:
    """Load what fits of ``pretrained`` into ``network`` (for ``channels`` and ``classes``, regions or
    labels), adapting the input layer and the heads. ``channel_map`` (``plan --channel-map``): a channel ->
    the source's channel whose input filters it takes (the others match by name)."""
    channels = [(channel_map or {}).get(name, name) for name in channels]
    report = TransferReport()
    state = network.state_dict()
    rows = copied_classes(pretrained, classes, regions)
    same_classes = len(rows) == len(classes) == len(pretrained.classes) and all(i == j for i, j in rows.items())
    unmatched = []
    for name, target in state.items():
        weight = pretrained.weights.get(name)
        if name.startswith(HEADS) and not same_classes and (weight is None or weight.shape[1:] == target.shape[1:]):
            state[name] = _adapt_head(target, weight, rows)
            (report.adapted if rows and weight is not None else report.reinitialised).append(name)
        elif name == INPUT_LAYER and weight is not None and list(pretrained.channels) != list(channels):
            state[name] = _adapt_input_layer(weight, pretrained.channels, channels, report)
            report.adapted.append(name)
        elif weight is not None and weight.shape == target.shape:
            state[name] = weight.to(target.dtype)
            report.loaded.append(name)
        else:
            unmatched.append(
                f"{name} {tuple(target.shape)} vs {tuple(weight.shape) if weight is not None else 'absent'}"
            )
    if unmatched:
        raise CheckpointError(
            f"{pretrained.source}: {len(unmatched)} weight(s) do not fit this network, e.g. "
            f"{unmatched[0]}; the topologies differ: plan this dataset with `autoseg plan --like` "
            "that model"
        )
    if not same_classes:
        _note_heads(report, pretrained, classes, regions, rows)
    network.load_state_dict(state)
    return report


def _adapt_head(fresh: torch.Tensor, source: torch.Tensor | None, rows: dict[int, int]) -> torch.Tensor:
    """A head's weight ``(K, F, *1)`` or bias ``(K,)``: the source's row for each copied class, fresh rows
    (the network's own initialisation) for the others."""
    adapted = fresh.clone()
    if source is not None:
        for row, source_row in rows.items():
            adapted[row] = source[source_row].to(fresh.dtype)
    return adapted


def _note_heads(
    report: TransferReport, pretrained: Pretrained, classes: Sequence[str], regions: bool, rows: dict[int, int]
) -> None:
    """Say which classes' head rows came from the source and which start fresh, and why."""
    report.classes_copied = [classes[i] for i in sorted(rows)]
    report.classes_fresh = [n for i, n in enumerate(classes) if i not in rows]
    kinds = {True: "regions (sigmoid)", False: "labels (softmax)"}
    if pretrained.regions != regions:
        report.notes.append(
            f"segmentation heads start fresh: this dataset's classes are {kinds[regions]}, the "
            f"source's {list(pretrained.classes)} are {kinds[pretrained.regions]}"
        )
        return
    report.notes.append(
        f"segmentation heads: classes {report.classes_copied or 'none'} copied from the source by "
        f"name, {report.classes_fresh or 'none'} start fresh (the source has {list(pretrained.classes)})"
    )


def _adapt_input_layer(
    weight: torch.Tensor, source_channels: Sequence[str], channels: Sequence[str], report: TransferReport
) -> torch.Tensor:
    """First convolution ``(F, C, *k)`` rebuilt for ``channels``: by name, new ones from the mean."""
    by_key = {channel_key(n): i for i, n in enumerate(source_channels)}
    mean = weight.mean(dim=1)
    columns = []
    for name in channels:
        index = by_key.get(channel_key(name))
        if index is None:
            report.notes.append(
                f"new channel {name!r}: its input filters start from the mean of the source's "
                f"{len(source_channels)} channels"
            )
        columns.append(weight[:, index] if index is not None else mean)
    if all(channel_key(n) not in by_key for n in channels):
        report.notes.append(
            f"no channel in common with the source {list(source_channels)}: every input filter starts from the "
            "mean of the source's (`plan --like --channel-map NEW=SOURCE` takes one channel's instead)"
        )
    kept = {channel_key(n) for n in channels}
    dropped = [n for n in source_channels if channel_key(n) not in kept]
    if dropped:
        report.notes.append(f"source channel(s) {dropped} are not in this dataset: their input filters are dropped")
    return torch.stack(columns, dim=1).contiguous()
