"""The demo's ``overview.png``: held-out cases (truth beside prediction, every channel) and the training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.visual.render import CaseView, axis_codes, draw_panel, intensity_window, legend_handles, plane, save_figure


def axial_axis(view: CaseView) -> int:
    """The array axis running superior-inferior (axial slices are taken across it)."""
    codes = axis_codes(view.geometry)
    return next((a for a, c in enumerate(codes) if c in "SI"), 0)


def render_overview(views: Sequence[CaseView], epochs: Sequence[dict], path: Path, title: str = "") -> Path:
    """One row per case: each channel at the axial slice with most tumour, truth | prediction; curves on the right."""
    from matplotlib.figure import Figure

    n_channels = views[0].image.shape[0]
    fig = Figure(figsize=(2 * n_channels * 1.45 + 4.5, 1.7 * len(views) + 1.0), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[2 * n_channels * 1.45, 4.5])
    axes = left.subplots(len(views), 2 * n_channels, squeeze=False)
    for row, view in enumerate(views):
        axis = axial_axis(view)
        tumour = view.label if view.label is not None and view.label.any() else view.foreground
        index = int(np.argmax((tumour > 0).sum(axis=tuple(a for a in range(3) if a != axis))))
        channels, (truth, prediction, _), aspect, _ = plane(view, axis, index)
        values = sorted(view.label_names)
        for c in range(n_channels):
            window = intensity_window(view.image[c])
            name = view.channel_names[c]
            draw_panel(
                axes[row][2 * c],
                channels[c],
                [truth, None],
                aspect,
                window,
                values,
                f"{name} truth" if row == 0 else "",
            )
            draw_panel(
                axes[row][2 * c + 1],
                channels[c],
                [None, prediction],
                aspect,
                window,
                values,
                f"{name} prediction" if row == 0 else "",
            )
        axes[row][0].set_ylabel(f"{view.case_id}\nslice {index}", fontsize=8)
    left.legend(
        handles=legend_handles(views[0].label_names, True, True),
        loc="outside lower center",
        ncols=5,
        fontsize=8,
        frameon=False,
    )
    _curves(right, epochs)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _curves(fig, epochs: Sequence[dict]) -> None:
    """Losses and the patch pseudo-Dice per epoch, as in the fold's progress.png."""
    from matplotlib.ticker import MaxNLocator

    top, bottom = fig.subplots(2, 1, sharex=True)
    x = [e["epoch"] + 1 for e in epochs]
    top.plot(x, [e["train_loss"] for e in epochs], label="train loss")
    top.plot(x, [e["val_loss"] for e in epochs], label="validation loss")
    top.legend(fontsize=7)
    top.set_title("training curves (fold 0)", fontsize=9)
    for name in epochs[0]["pseudo_dice"] if epochs else {}:
        bottom.plot(x, [e["pseudo_dice"][name] for e in epochs], label=name)
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("pseudo Dice", fontsize=8)
    bottom.set_xlabel("epoch", fontsize=8)
    bottom.legend(fontsize=7)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
