"""Map the series of one DICOM study (one subfolder per series) to a model's channels.

A scanner exports a study as a set of series, named by their SeriesDescription ("AX T2 FLAIR",
"T1 MPRAGE POST GD"), not by the model's channel order. A brain-tumour model (channels that
are the four BraTS sequences, see :func:`autoseg.data.io.datasets.brats_channel_order`) gets each
series classified by sequence; any other model gets the series whose description contains
the channel name's words. Series no channel asks for (localisers, DWI) are left out; a channel
that no series, or several series, match is an error naming the series.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoseg.core.errors import DatasetError
from autoseg.data.io.datasets import brats_channel_key, brats_channel_order, is_junk

log = logging.getLogger(__name__)

#: Words that mark a post-contrast T1 in a series description ("T1 POST GD", "T1 +C", "T1 C+").
_CONTRAST_WORDS = {"ce", "gd", "gad", "gado", "gadolinium", "post", "postcontrast", "contrast", "c"}
_DESCRIPTION_TAGS = ("0008|103e", "0018|1030")  # SeriesDescription, then ProtocolName


@dataclass(frozen=True)
class Series:
    folder: Path
    description: str


def map_series_to_channels(case_dir: Path, channel_names: Sequence[str]) -> tuple[Path, ...]:
    """The series folder of each channel, in the order of ``channel_names``.

    Raises DatasetError naming the case when a channel has no series or several.
    """
    case_dir = Path(case_dir)
    series = list_series(case_dir)
    if not series:
        raise DatasetError(f"case {case_dir.name}: no DICOM series in its subfolders")
    if len(channel_names) == 1 and len(series) == 1:
        return (series[0].folder,)
    brats_keys = brats_channel_order(channel_names)
    if brats_keys is not None:
        wanted = {name: key for name, key in zip(channel_names, brats_keys)}
        matches = {name: [s for s in series if sequence_key(s.description) == key] for name, key in wanted.items()}
    else:
        matches = {name: [s for s in series if _names_match(name, s.description)] for name in channel_names}
    return _assign(case_dir.name, channel_names, matches, series)


def list_series(case_dir: Path) -> list[Series]:
    """The subfolders of ``case_dir`` that hold a DICOM series, with their descriptions."""
    import SimpleITK as sitk

    found = []
    for folder in sorted(p for p in case_dir.iterdir() if p.is_dir() and not is_junk(p.name)):
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if ids:
            first = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])[0]
            found.append(Series(folder, _description(first)))
    return found


def sequence_key(description: str) -> str | None:
    """The BraTS sequence (FLAIR, T1, T1ce, T2) a series description names, or None if none or several.

    ``AX T2 FLAIR`` and ``t2_tirm_tra_dark-fluid`` -> FLAIR, ``T1 MPRAGE POST GD`` -> T1ce, ``T2*`` -> None.
    """
    text = description.lower()
    words = re.findall(r"[a-z0-9]+", text)
    compact = "".join(words)
    if "flair" in compact or "darkfluid" in compact:
        return "FLAIR"
    if re.search(r"t2\s*\*|t2star", text):  # T2* (gradient echo) is not T2
        return None
    keys = {brats_channel_key(word) for word in words} - {None}
    if keys == {"T1"} and (_CONTRAST_WORDS & set(words) or "+c" in text.replace(" ", "")):
        keys = {"T1ce"}
    return keys.pop() if len(keys) == 1 else None


def _names_match(channel: str, description: str) -> bool:
    """Every word of the channel name is a word of the description (``ADC`` ~ ``ADC map``)."""
    wanted = re.findall(r"[a-z0-9]+", channel.lower())
    return bool(wanted) and set(wanted) <= set(re.findall(r"[a-z0-9]+", description.lower()))


def _assign(
    case: str, channel_names: Sequence[str], matches: dict[str, list[Series]], series: list[Series]
) -> tuple[Path, ...]:
    problems, chosen = [], {}
    for name in channel_names:
        found = matches[name]
        if not found:
            problems.append(f"case {case}: no series matches channel {name!r} (series: {_listing(series)})")
        elif len(found) > 1:
            problems.append(
                f"case {case}: channel {name!r} is ambiguous, {_listing(found)} all match; "
                "keep one series per channel in the case folder"
            )
        else:
            chosen[name] = found[0]
    used = [s.folder for s in chosen.values()]
    for folder in {f for f in used if used.count(f) > 1}:
        names = [n for n, s in chosen.items() if s.folder == folder]
        problems.append(f"case {case}: series {folder.name} matches several channels ({', '.join(names)})")
    if problems:
        raise DatasetError(problems, header=f"Cannot map the series of case {case} to channels")
    for s in series:
        if s.folder not in used:
            log.info("case %s: series %s (%r) is not used", case, s.folder.name, s.description)
    return tuple(chosen[name].folder for name in channel_names)


def _listing(series: Sequence[Series]) -> str:
    return ", ".join(f"{s.folder.name} ({s.description!r})" for s in series)


def _description(path: str) -> str:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    for tag in _DESCRIPTION_TAGS:
        if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip():
            return reader.GetMetaData(tag).strip()
    return ""
