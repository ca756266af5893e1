"""The rows of the review page (:mod:`autoseg.visual.review_page`): a compressed picture of every case, three
orthogonal slices through its structures with the masks as contours per class, beside its numbers.

``predict``'s page is built from ``report.json`` (flags with reasons, volumes beside the training range,
estimated Dice, run time) plus the input images and the masks written beside it; ``evaluate``'s from
``summary.json`` (Dice per case and class), truth and prediction drawn side by side. Pages only read: no
image, mask or report is changed.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.core.errors import AutosegError, OptionError
from autoseg.core.files import atomic_write_bytes, read_json
from autoseg.core.geometry import voxel_volume_ml
from autoseg.data.io.datasets import CaseFiles
from autoseg.data.io.images import read_channels, read_label
from autoseg.data.qc.uncertainty import case_estimated_dice
from autoseg.visual.render import CaseView, best_slices, draw_panel, intensity_window, label_colour, plane
from autoseg.visual.review_page import Page, Picture, Row, render_page

log = logging.getLogger(__name__)

#: ``predict``'s review page, beside report.json; ``evaluate``'s, beside summary.json.
PREDICTION_PAGE = "report.html"
EVALUATION_PAGE = "evaluation.html"
#: Thumbnail panel height in pixels and WebP quality: 100 cases stay well under 20 MB (measured in the tests).
PANEL_PIXELS = 170
WEBP_QUALITY = 70


def channel_index(channel: str | None, channel_names: Sequence[str]) -> int:
    """The channel the pictures show: the first, or the one named (by name or number); else a usage error."""
    if channel is None:
        return 0
    names = list(channel_names)
    if channel in names:
        return names.index(channel)
    if channel.isdigit() and int(channel) < len(names):
        return int(channel)
    raise OptionError(
        f"{channel!r} is not a channel of this model; choose {', '.join(names)} (or 0..{len(names) - 1})",
        "--review-channel",
    )


def case_picture(view: CaseView, channel: int, masks: Sequence[tuple[str, np.ndarray | None]]) -> Picture:
    """Axial, coronal and sagittal slices through the masks' structures (their union), one row per mask,
    contours per class over ``channel``; a compressed WebP."""
    from matplotlib.figure import Figure

    union = np.zeros(view.geometry.shape, bool)
    for _, mask in masks:
        if mask is not None:
            union |= mask > 0
    slices = best_slices(union if union.any() else np.any(view.image != 0, axis=0))
    one = dataclasses.replace(view, image=view.image[channel : channel + 1], label=None, prediction=None, overlay=None)
    window = intensity_window(one.image[0])
    inch = PANEL_PIXELS / 100
    fig = Figure(figsize=(3 * inch, len(masks) * inch), dpi=100, facecolor="black")
    axes = fig.subplots(len(masks), 3, squeeze=False)
    fig.subplots_adjust(left=0.005, right=0.995, top=1 - 0.12 / len(masks), bottom=0.005, wspace=0.02, hspace=0.14)
    values = sorted(view.label_names)
    for row, (title, mask) in enumerate(masks):
        for column in range(3):
            channels, (cut, _, _), aspect, name = plane(dataclasses.replace(one, label=mask), column, slices[column])
            ax = axes[row][column]
            draw_panel(ax, channels[0], [cut, None], aspect, window, values)
            ax.set_title(f"{title}: {name} {slices[column]}", fontsize=7, color="white", pad=2)
            ax.set_facecolor("black")
    rows = [t for t, _ in masks]
    shown = f"the {rows[0]}" if len(rows) == 1 else f"the {rows[0]} (top row) and the {rows[1]} (bottom row)"
    return _webp(fig, f"{view.case_id}: contours of {shown} on {view.channel_names[channel]}")


def _webp(fig, caption: str) -> Picture:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=4)
    return Picture(caption, "image/webp", buffer.getvalue(), image.width, image.height)


def prediction_row(
    case_id: str,
    case: CaseFiles | None,
    entry: dict,
    mask_path: Path,
    channel: int,
    names: tuple[Sequence[str], dict[int, str]],
) -> Row:
    """One case of ``predict``'s page from its report.json entry, its image and its mask (either may be
    missing: the row then says so and shows the numbers)."""
    channel_names, label_names = names
    structures = entry.get("structures", {})
    table = tuple(
        (
            name,
            f"{volume['volume_ml']:.3g}",
            _range(volume.get("training_ml")),
            _number(structures.get(name, {}).get("estimated_dice")),
        )
        for name, volume in entry.get("volumes", {}).items()
    )
    pictures, volume, note = (), None, _run_note(entry)
    if case is not None and mask_path.is_file():
        try:
            image, geometry = read_channels(case.images)
            mask, _ = read_label(mask_path)
            view = CaseView(case_id, image, geometry, tuple(channel_names), label_names)
            pictures = (case_picture(view, channel, [("prediction", mask)]),)
            volume = float(np.count_nonzero(mask)) * voxel_volume_ml(geometry.spacing)
        except (AutosegError, OSError, ValueError) as exc:
            note += f"; no picture: {str(exc).splitlines()[0]}"
    else:
        note += "; no picture: the input or the NIfTI mask is not there"
    if volume is None:
        volume = sum(v["volume_ml"] for v in entry.get("volumes", {}).values()) or None
    return Row(
        case_id=case_id,
        pictures=pictures,
        flags=tuple((f["flag"], f["reason"]) for f in entry.get("flags", [])),
        header=("structure", "volume (ml)", "training range (ml)", "estimated Dice"),
        table=table,
        volume_ml=volume,
        score=case_estimated_dice(structures),
        note=note,
    )


def review_order(rows: Sequence[Row]) -> list[Row]:
    """Flagged first, then the lowest score (least confident, or worst Dice), then by name."""
    return sorted(rows, key=lambda r: (not r.flagged, 2.0 if r.score is None else r.score, r.case_id))


def write_prediction_page(
    output: Path,
    cases: Sequence[CaseFiles],
    channel: int,
    channel_names: Sequence[str],
    label_names: dict[int, str],
    model: str,
) -> Path:
    """``output/report.html`` from ``output/report.json``, the ``cases`` predicted and their masks."""
    report = read_json(output / "report.json")
    by_id, names = {c.case_id: c for c in cases}, (channel_names, label_names)
    rows = [
        prediction_row(case_id, by_id.get(case_id), entry, output / f"{case_id}.nii.gz", channel, names)
        for case_id, entry in report.get("cases", {}).items()
    ]
    settings = report.get("settings", {})
    run = (
        ("model", model),
        ("settings", ", ".join(f"{k.replace('_', ' ')} {_setting(v)}" for k, v in settings.items())),
        ("uncertainty", "on" if any("structures" in r for r in report.get("cases", {}).values()) else "off"),
        ("written", _now()),
        ("report", str(output / "report.json")),
    )
    page = Page(f"Predictions in {output}", run, review_order(rows), legend=_legend(label_names))
    return write_page(output / PREDICTION_PAGE, page)


def write_page(path: Path, page: Page) -> Path:
    """Write the page atomically (a browser never opens half of it)."""
    atomic_write_bytes(path, render_page(page).encode("utf-8"))
    log.debug("review page: %s", path)
    return path


def evaluation_row(
    case_id: str,
    scores: dict[str, dict],
    paths: tuple[Path, Path, CaseFiles | None],
    channel: int,
    names: tuple[Sequence[str], dict[int, str]],
    flags: Sequence[dict] = (),
) -> Row:
    """One case of ``evaluate``'s page: Dice and volumes per class, truth and prediction side by side (over the
    image when it is known, else over a blank background)."""
    prediction_path, truth_path, case = paths
    channel_names, label_names = names
    truth, geometry = read_label(truth_path)
    prediction, _ = read_label(prediction_path)
    image, note = _image_on_grid(case, truth.shape, channel)
    if image is None:
        image, channel, channel_names = np.zeros((1, *truth.shape), np.float32), 0, ("a blank background",)
    view = CaseView(case_id, image, geometry, tuple(channel_names), label_names or _found(truth, prediction))
    picture = case_picture(view, channel, [("truth", truth), ("prediction", prediction)])
    dice = [s["dice"] for s in scores.values() if s.get("dice") is not None]
    table = tuple(
        (name, _number(s.get("dice")), _number(s.get("true_volume_ml")), _number(s.get("pred_volume_ml")))
        for name, s in scores.items()
    )
    return Row(
        case_id=case_id,
        pictures=(picture,),
        flags=tuple((f["flag"], f["reason"]) for f in flags),
        header=("class", "Dice", "truth (ml)", "prediction (ml)"),
        table=table,
        volume_ml=float(np.count_nonzero(prediction)) * voxel_volume_ml(geometry.spacing),
        score=float(np.mean(dice)) if dice else None,
        note=f"mean Dice {_number(float(np.mean(dice)) if dice else None)}" + note,
    )


def _image_on_grid(case: CaseFiles | None, shape: Sequence[int], channel: int) -> tuple[np.ndarray | None, str]:
    """The case's image when it is given, readable, on the masks' grid and has ``channel``; else None and why not."""
    if case is None:
        return None, ""
    try:
        image, geometry = read_channels(case.images)
    except (AutosegError, OSError, ValueError) as exc:
        return None, f"; image not drawn: {str(exc).splitlines()[0]}"
    if tuple(geometry.shape) != tuple(shape):
        return None, f"; image not drawn: its shape {tuple(geometry.shape)} is not the masks' {tuple(shape)}"
    if channel >= image.shape[0]:
        return None, f"; image not drawn: it has no channel {channel}"
    return image, ""


def write_evaluation_page(
    summary: dict,
    output: Path,
    images: Sequence[CaseFiles] | None,
    channel: int,
    label_names: dict[int, str],
) -> Path:
    """``output/evaluation.html``: every scored case, the worst mean Dice first (flagged ones first when the
    predictions folder holds predict's report.json)."""
    predictions, truth = Path(summary["predictions"]), Path(summary["truth"])
    by_id = {c.case_id: c for c in images or ()}
    channel_names = tuple(f"channel {c}" for c in range(channel + 1))
    flags = _report_flags(predictions / "report.json")
    rows = []
    for case_id, scores in summary["cases"].items():
        paths = (_mask_file(predictions, case_id), _mask_file(truth, case_id), by_id.get(case_id))
        names = (channel_names, label_names)
        rows.append(evaluation_row(case_id, scores, paths, channel, names, flags.get(case_id, ())))
    rows.sort(key=lambda r: (2.0 if r.score is None else r.score, r.case_id))  # worst first
    run = (
        ("predictions", str(predictions)),
        ("truth", str(truth)),
        ("images", "given" if images else "not given (contours on a blank background; evaluate --images DIR)"),
        ("written", _now()),
    )
    page = Page(f"Evaluation of {predictions}", run, rows, score_name="Dice", legend=_legend(label_names))
    return write_page(output / EVALUATION_PAGE, page)


def _report_flags(path: Path) -> dict[str, list[dict]]:
    """predict's flags per case, when the predictions folder holds its report.json."""
    try:
        return {c: e.get("flags", []) for c, e in read_json(path).get("cases", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _mask_file(folder: Path, case_id: str) -> Path:
    from autoseg.data.io.images import ITK_SUFFIXES

    for suffix in ITK_SUFFIXES:
        if (folder / f"{case_id}{suffix}").is_file():
            return folder / f"{case_id}{suffix}"
    return folder / f"{case_id}.nii.gz"


def _found(*masks: np.ndarray) -> dict[int, str]:
    values = sorted({int(v) for m in masks for v in np.unique(m)} - {0})
    return {v: f"label {v}" for v in values}


def _legend(label_names: dict[int, str]) -> tuple[tuple[str, str], ...]:
    return tuple((label_colour(v), f"{v} {n}") for v, n in sorted(label_names.items()))


def _range(values: Sequence[float | None] | None) -> str:
    """A training range, or a dash where the model has none (an imported nnU-Net model knows no volumes)."""
    if not values or any(v is None for v in values):
        return "—"
    return f"{values[0]:.3g}–{values[1]:.3g}"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}" if value < 10 else f"{value:.3g}"


def _run_note(entry: dict) -> str:
    geometry = entry.get("input", {})
    parts = [f"run time {entry['seconds']:.1f} s" if "seconds" in entry else "run time —"]
    if geometry:
        shape = "×".join(map(str, geometry.get("shape", [])))
        spacing = "×".join(f"{s:.3g}" for s in geometry.get("spacing", []))
        parts.append(f"{shape} voxels of {spacing} mm, {geometry.get('orientation', '?')}")
    return "; ".join(parts)


def _setting(value: object) -> str:
    """report.json's settings as words: lists joined, None as off, booleans as yes/no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
