"""Figures of a case: what ``autoseg show`` draws and the demo's overview reuses.

Every channel is drawn at the slice with the most foreground in the three
orientations, in physical proportions (the pixel aspect is the spacing ratio), with
the truth as solid and the prediction as dashed contours, a legend with the label
names and one line of case facts. Slices are shown the radiological way: superior
and anterior up, the patient's right on the viewer's left, whatever the voxel order.
matplotlib is imported inside functions (Agg backend) so ``autoseg --help`` stays fast.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg.core.errors import DatasetError
from autoseg.core.geometry import Geometry, orientation_code, voxel_volume_ml

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Contour colours per label value 1, 2, 3, ... (cycled).
LABEL_COLOURS = ("#ffd700", "#ff3030", "#00e5ff", "#7CFC00", "#ff8c00", "#da70d6")
#: Plane names by the anatomical axis the slice is taken across.
_PLANE = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "R": "sagittal", "L": "sagittal"}


@dataclass(frozen=True)
class CaseView:
    """One case in memory: channels ``(C, z, y, x)``, optional truth and prediction ``(z, y, x)``."""

    case_id: str
    image: np.ndarray
    geometry: Geometry
    channel_names: tuple[str, ...]
    label_names: dict[int, str]
    label: np.ndarray | None = None
    prediction: np.ndarray | None = None
    #: a voxel map in [0, 1] drawn as a translucent heat map (e.g. ``predict --uncertainty``'s entropy).
    overlay: np.ndarray | None = None

    @property
    def foreground(self) -> np.ndarray:
        """Where to look: the truth, else the prediction, else the non-zero image."""
        for mask in (self.label, self.prediction):
            if mask is not None and mask.any():
                return mask > 0
        return np.any(self.image != 0, axis=0)


def axis_codes(geometry: Geometry) -> str:
    """Orientation letter of each array axis (z, y, x): the reverse of the voxel axes i, j, k."""
    return orientation_code(geometry)[::-1]


def label_volumes_ml(label: np.ndarray, spacing: Sequence[float], names: dict[int, str]) -> dict[str, float]:
    """Volume of every declared foreground label (and any undeclared value found) in millilitres."""
    voxel_ml = voxel_volume_ml(spacing)
    values = sorted(set(names) | {int(v) for v in np.unique(label)} - {0})
    return {names.get(v, str(v)): float(np.count_nonzero(label == v)) * voxel_ml for v in values}


def case_facts(view: CaseView) -> str:
    """One line: shape, spacing, orientation, intensity range per channel, label volumes in ml."""
    g = view.geometry
    parts = [
        f"{view.case_id}: shape {'×'.join(map(str, g.shape))}",
        f"spacing {'×'.join(f'{s:.3g}' for s in g.spacing)} mm",
        f"orientation {orientation_code(g)}",
    ]
    parts += [
        f"{name} {float(channel.min()):.4g}..{float(channel.max()):.4g}"
        for name, channel in zip(view.channel_names, view.image)
    ]
    for title, mask in (("truth", view.label), ("prediction", view.prediction)):
        if mask is not None:
            volumes = label_volumes_ml(mask, g.spacing, view.label_names)
            parts.append(f"{title} " + ", ".join(f"{n} {v:.2f} ml" for n, v in volumes.items()))
    return "; ".join(parts)


def best_slices(mask: np.ndarray) -> tuple[int, int, int]:
    """For each array axis, the index of the slice holding the most foreground voxels."""
    return tuple(int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))


def plane(view: CaseView, axis: int, index: int) -> tuple[np.ndarray, list[np.ndarray | None], float, str]:
    """The slice across ``axis`` as displayed: (channels, [truth, prediction, overlay], pixel aspect, plane name).

    Rows run superior/anterior -> inferior/posterior and columns the patient's right ->
    left (anterior first in sagittal views), so every case looks the same way round.
    """
    codes = axis_codes(view.geometry)
    rows, cols = [a for a in range(3) if a != axis]

    def cut(array: np.ndarray | None) -> np.ndarray | None:
        if array is None:
            return None
        out = np.take(array, index, axis=array.ndim - 3 + axis)
        if codes[rows] in "SA":
            out = np.flip(out, axis=-2)
        if codes[cols] in "RA":
            out = np.flip(out, axis=-1)
        return out

    aspect = view.geometry.spacing[rows] / view.geometry.spacing[cols]
    return cut(view.image), [cut(view.label), cut(view.prediction), cut(view.overlay)], aspect, _PLANE[codes[axis]]


def intensity_window(channel: np.ndarray) -> tuple[float, float]:
    """0.5-99.5 percentiles of the non-zero voxels (skull-stripped MR has a zero background)."""
    values = channel[channel != 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def draw_panel(
    ax: Axes,
    image2d: np.ndarray,
    masks: Sequence[np.ndarray | None],
    aspect: float,
    window: tuple[float, float],
    label_values: Sequence[int],
    title: str = "",
) -> None:
    """One grey slice with contours: masks[0] (truth) solid, masks[1] (prediction) dashed; masks[2], a map
    in [0, 1], as a heat map that is transparent where it is 0."""
    ax.imshow(image2d, cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
    if len(masks) > 2 and masks[2] is not None:
        heat = np.ma.masked_less_equal(masks[2], OVERLAY_FLOOR)
        ax.imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
    for mask, style in zip(masks[:2], ("solid", "dashed")):
        if mask is None:
            continue
        # Neighbouring labels share a boundary: the larger drawn first, so every smaller one stays whole.
        for value in sorted(label_values, key=lambda v: -np.count_nonzero(mask == v)):
            region = (mask == value).astype(np.float32)
            if region.any() and not region.all():
                ax.contour(region, levels=[0.5], colors=[label_colour(value)], linewidths=1.0, linestyles=style)
    ax.set_aspect(aspect)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


#: overlay values at or below this are not drawn (the image shows through).
OVERLAY_FLOOR = 0.02


def label_colour(value: int) -> str:
    return LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]


def legend_handles(label_names: dict[int, str], truth: bool, prediction: bool) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=label_colour(v), lw=2, label=f"{v} {n}") for v, n in sorted(label_names.items())]
    if truth:
        handles.append(Line2D([], [], color="black", lw=1, linestyle="solid", label="truth"))
    if prediction:
        handles.append(Line2D([], [], color="black", lw=1, linestyle="dashed", label="prediction"))
    return handles


def render_case(view: CaseView) -> Figure:
    """Figure with one row per channel and one column per orientation, legend and facts line."""
    from matplotlib.figure import Figure

    slices = best_slices(view.foreground)
    n_channels = view.image.shape[0]
    fig = Figure(figsize=(9, 2.8 * n_channels + 1.2), layout="constrained")
    axes = fig.subplots(n_channels, 3, squeeze=False)
    windows = [intensity_window(c) for c in view.image]
    values = sorted(view.label_names)
    for column, axis in enumerate(range(3)):
        channels, masks, aspect, name = plane(view, axis, slices[axis])
        for row in range(n_channels):
            title = f"{view.channel_names[row]}, {name} slice {slices[axis]}"
            draw_panel(axes[row][column], channels[row], masks, aspect, windows[row], values, title)
    if values and (view.label is not None or view.prediction is not None):
        fig.legend(
            handles=legend_handles(view.label_names, view.label is not None, view.prediction is not None),
            loc="outside upper center",
            ncols=6,
            fontsize=8,
            frameon=False,
        )
    fig.supxlabel(_wrap(case_facts(view), 120), fontsize=7)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


#: Formats ``show -o`` may name by its suffix.
FIGURE_FORMATS = ("png", "jpg", "jpeg", "pdf", "svg")


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """Write the figure atomically (a reader never sees half an image), in the format its suffix names."""
    from autoseg.core.errors import AutosegError
    from autoseg.core.files import atomic_write_bytes

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise AutosegError(f"{path}: give a file ending in {', '.join('.' + f for f in FIGURE_FORMATS)}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=suffix, dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def check_grid(view: CaseView) -> None:
    """Masks must lie on the image's voxel grid, or their contours would be drawn in the wrong place."""
    for title, mask in (("label", view.label), ("prediction", view.prediction), ("overlay", view.overlay)):
        if mask is not None and tuple(mask.shape) != tuple(view.geometry.shape):
            raise DatasetError(
                f"case {view.case_id}: the {title} has shape {mask.shape}, the image "
                f"{tuple(view.geometry.shape)}; pass the mask of this case"
            )
