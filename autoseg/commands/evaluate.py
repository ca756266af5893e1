"""``autoseg evaluate``: score a folder of predicted masks against the truth (summary.json, metrics.csv) and
draw the review page of the scored cases, the worst first (evaluation.html)."""

from __future__ import annotations

import logging
from pathlib import Path

from autoseg.core.errors import AutosegError, OptionError
from autoseg.data.evaluation.evaluate import LABEL_CONVENTIONS, REGION_PRESETS, evaluate_folders
from autoseg.data.evaluation.lesions import LesionRule

log = logging.getLogger(__name__)


def evaluate(
    *,
    predictions: Path,
    truth: Path,
    output: Path | None = None,
    labels: str = "consecutive",
    regions: str | None = None,
    dataset_json: Path | None = None,
    lesion_wise: bool = False,
    lesion_dilation: int = 3,
    lesion_min_volume: float = 50.0,
    review_page: bool = True,
    images: Path | None = None,
    review_channel: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Check the label convention and regions by name, then :func:`evaluate_folders` (lesion-wise with
    ``lesion_wise``: truth fragments merged by ``lesion_dilation``, lesions up to ``lesion_min_volume`` mm3
    not scored). ``review_page``: also ``evaluation.html`` (truth and prediction contours over channel
    ``review_channel`` of the cases in ``images``, else over a blank background); the summary returned
    (not the one written) then names it under ``review_page``."""
    if labels not in LABEL_CONVENTIONS:
        raise OptionError(f"choose {' or '.join(LABEL_CONVENTIONS)}", "--labels")
    if regions is not None and regions not in REGION_PRESETS:
        raise OptionError(f"choose {' or '.join(REGION_PRESETS)}", "--regions")
    cases, channel = _review_inputs(review_page, images, review_channel)
    rule = LesionRule(lesion_dilation, lesion_min_volume) if lesion_wise else None
    summary = evaluate_folders(
        predictions=predictions,
        truth=truth,
        labels=labels,
        regions=regions,
        output=output,
        dataset_json=dataset_json,
        lesion_rule=rule,
        show_progress=show_progress,
    )
    if review_page:
        folder = Path(output if output is not None else predictions).expanduser().resolve()
        page = _write_page(summary, folder, cases, channel, labels)
        return summary | ({"review_page": str(page)} if page is not None else {})
    return summary


def _review_inputs(review_page: bool, images: Path | None, channel: str | None) -> tuple[list | None, int]:
    """The cases whose images the page draws and the channel, checked before anything is scored or written."""
    for given, option in ((images, "--images"), (channel, "--review-channel")):
        if given is not None and not review_page:
            raise OptionError("is for the review page, which --no-review-page turns off", option)
    if channel is not None and images is None:
        raise OptionError("names a channel of --images; give the images too", "--review-channel")
    if channel is not None and not channel.isdigit():
        raise OptionError(f"{channel!r} is not a channel number (0 is the first)", "--review-channel")
    if images is None:
        return None, 0
    from autoseg.data.io.images import read_channels
    from autoseg.inference.inputs import find_cases

    cases = find_cases(Path(images))
    count = read_channels(cases[0].images)[0].shape[0]
    index = int(channel or 0)
    if index >= count:
        raise OptionError(f"{index} is not a channel of {cases[0].case_id}, which has {count}", "--review-channel")
    return cases, index


def _write_page(summary: dict, folder: Path, cases: list | None, channel: int, labels: str) -> Path | None:
    from autoseg.visual.review_cases import write_evaluation_page

    names = {}
    if labels == "consecutive":  # the files' values are the scored ones: their names are known
        names = {c["values"][0]: n for n, c in summary["classes"].items() if c["kind"] == "label"}
    try:
        return write_evaluation_page(summary, folder, cases, channel, names)
    except (AutosegError, OSError, ValueError) as exc:
        log.warning("the review page was not written: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None
