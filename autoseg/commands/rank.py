"""``autoseg rank``: which unlabelled scans to label next.

Every scan is predicted as ``predict --uncertainty`` does (the same options, report.json and review page);
then the scans are ranked by the model's doubt, least confident first: the lowest estimated Dice (the mean
over the structures, :func:`autoseg.data.qc.uncertainty.case_estimated_dice`), then the largest uncertain
volume. Scans that quality control flags as unlike the training scans (another spacing, field of view,
intensities, swapped channels) are listed apart: the model's doubt there says more about the scan than
about what a label would teach it. ``ranking.csv`` holds both lists.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoseg.commands.predict import PredictionReport, PredictOptions, predict_cases
from autoseg.core.files import atomic_write_bytes
from autoseg.data.qc.uncertainty import case_estimated_dice

log = logging.getLogger(__name__)

#: The ranking, in the output folder beside the masks, maps, report.json and report.html.
RANKING = "ranking.csv"
RANKING_COLUMNS = ("rank", "case", "estimated_dice", "uncertain_ml", "flags", "out_of_distribution")
#: The QC flags that say the scan is unlike the training scans (the others are the model's doubt about
#: a scan like them: volume, empty structure, low estimated Dice, fold disagreement).
OUT_OF_DISTRIBUTION = ("spacing", "field_of_view", "intensity_range", "intensity_profile", "swapped_channels")
#: A voxel counts as uncertain where the normalised entropy (``<case>_entropy.nii.gz``) reaches this.
UNCERTAIN_ENTROPY = 0.5


@dataclass(frozen=True)
class RankedCase:
    case: str
    estimated_dice: float | None
    uncertain_ml: float | None
    flags: tuple[str, ...]

    @property
    def out_of_distribution(self) -> bool:
        return any(flag in OUT_OF_DISTRIBUTION for flag in self.flags)


@dataclass
class Ranking:
    """What ``rank`` found: the ranked scans (least confident first), those listed apart, the prediction run."""

    ranked: list[RankedCase]
    apart: list[RankedCase]
    prediction: PredictionReport
    path: Path


def rank(options: PredictOptions) -> Ranking:
    """Predict every scan of ``options.input`` with the uncertainty estimate (forced on) into
    ``options.output``, then write ``ranking.csv`` there."""
    options = dataclasses.replace(options, uncertainty=True)
    prediction = predict_cases(options)
    cases = {c: prediction.cases[c] for c in sorted(prediction.cases) if c not in prediction.failed}
    found = {case: uncertain_volume(options.output / f"{case}_entropy.nii.gz") for case in cases}
    ranked, apart = rank_cases(cases, found)
    without = [r.case for r in ranked if r.estimated_dice is None]
    if without:
        log.warning(
            "%d case(s) were predicted without the uncertainty estimate by an earlier run and are ranked last "
            "(%s); rank again with --overwrite",
            len(without),
            ", ".join(without[:5]),
        )
    path = options.output / RANKING
    atomic_write_bytes(path, ranking_csv(ranked, apart).encode())
    return Ranking(ranked, apart, prediction, path)


def rank_cases(
    entries: dict[str, dict], uncertain_ml: dict[str, float | None]
) -> tuple[list[RankedCase], list[RankedCase]]:
    """report.json's case entries ranked: least confident first (lowest estimated Dice, then the largest
    uncertain volume, then the name), and apart the out-of-distribution cases in the same order."""
    cases = [
        RankedCase(
            case,
            case_estimated_dice(entry.get("structures", {})),
            uncertain_ml.get(case),
            tuple(f["flag"] for f in entry.get("flags", [])),
        )
        for case, entry in entries.items()
    ]
    cases.sort(
        key=lambda r: (
            r.estimated_dice is None,
            r.estimated_dice or 0.0,
            -(r.uncertain_ml or 0.0),
            r.case,
        )
    )
    return [r for r in cases if not r.out_of_distribution], [r for r in cases if r.out_of_distribution]


def uncertain_volume(entropy_map: Path) -> float | None:
    """Millilitres where the normalised entropy reaches :data:`UNCERTAIN_ENTROPY`; None without the map."""
    if not entropy_map.is_file():
        return None
    import numpy as np

    from autoseg.core.geometry import voxel_volume_ml
    from autoseg.data.io.images import read_channels

    entropy, geometry = read_channels([entropy_map])
    return float(np.count_nonzero(entropy[0] >= UNCERTAIN_ENTROPY)) * voxel_volume_ml(geometry.spacing)


def ranking_csv(ranked: Sequence[RankedCase], apart: Sequence[RankedCase]) -> str:
    """The ranked cases numbered from 1, then those apart (no rank, ``out_of_distribution`` yes)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RANKING_COLUMNS)
    for number, case in enumerate([*ranked, *apart], start=1):
        writer.writerow(
            [
                number if not case.out_of_distribution else "",
                case.case,
                "" if case.estimated_dice is None else f"{case.estimated_dice:.4f}",
                "" if case.uncertain_ml is None else f"{case.uncertain_ml:.3f}",
                " ".join(case.flags),
                "yes" if case.out_of_distribution else "no",
            ]
        )
    return buffer.getvalue()


def summary(ranking: Ranking, shown: int = 10) -> list:
    """What ``rank`` prints: the first ranked scans, those listed apart, where the files are."""
    from autoseg.core.tables import table

    def cells(r: RankedCase, number: str) -> list[str]:
        dice = "—" if r.estimated_dice is None else f"{r.estimated_dice:.3f}"
        volume = "—" if r.uncertain_ml is None else f"{r.uncertain_ml:.2f}"
        return [number, r.case, dice, volume, ", ".join(r.flags) or "—"]

    columns = ["rank", "case", "estimated Dice", "uncertain ml", "flags"]
    rows = [cells(r, str(n)) for n, r in enumerate(ranking.ranked[:shown], start=1)]
    lines: list = [table(f"Label these first (least confident of {len(ranking.ranked)})", columns, rows, right={2, 3})]
    if ranking.apart:
        apart = [cells(r, "—") for r in ranking.apart]
        lines.append(table("Out of distribution (listed apart: unlike the training scans)", columns, apart))
    lines.append(f"ranking: {ranking.path}")
    if ranking.prediction.page is not None:
        lines.append(f"review page: {ranking.prediction.page} (least confident first: open it with #sort=score)")
    lines += [f"{case}: failed: {reason}" for case, reason in ranking.prediction.failed.items()]
    return lines
