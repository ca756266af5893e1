"""Find the cases in a folder given to ``autoseg predict``, in any layout ``autoseg plan`` reads.

* ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` ... (nnU-Net): one case per ``CASE``;
* any other image file (``.nii(.gz)``, ``.nrrd``, ``.mha``): one case, all its channels inside
  (e.g. an MSD 4D NIfTI);
* a folder holding ``<case>_flair/_t1/_t1ce/_t2`` files (BraTS): one case, its files in the
  model's channel order when the model names the four sequences;
* a folder holding one DICOM series: one single-channel case; ``CASE_0000/`` series folders
  group into channels like files do;
* a dataset folder with ``imagesTs/`` (or ``imagesTr/``) is searched there.
A single file is one case; a single ``CASE_0000`` file brings its sibling channel files along.
A BraTS case folder or a DICOM series folder given by itself is one case.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path

from autoseg.core.errors import DatasetError
from autoseg.data.io.datasets import BRATS_CHANNELS, CaseFiles, brats_channel_order, brats_suffix, is_junk
from autoseg.data.io.dicom_study import map_series_to_channels
from autoseg.data.io.images import ITK_SUFFIXES, strip_suffix

#: the folders of a dataset in the nnU-Net/MSD layout, never cases themselves.
DATASET_FOLDERS = ("imagesTr", "imagesTs", "labelsTr", "labelsTs")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def find_cases(source: Path, channel_names: Sequence[str] | None = None) -> list[CaseFiles]:
    """Cases to predict under ``source`` (a folder or one file), sorted by id.

    ``channel_names`` (the model's) orders the files of BraTS case folders when the names are
    the four BraTS sequences (see :func:`brats_channel_order`); otherwise they come as FLAIR,
    T1, T1ce, T2.
    """
    order = brats_channel_order(channel_names) if channel_names else None
    source = Path(source).expanduser()
    if not source.exists():
        raise DatasetError(f"input {source} does not exist")
    if source.is_file():
        if not source.name.lower().endswith(ITK_SUFFIXES):
            raise DatasetError(f"input {source} is not an image file ({', '.join(ITK_SUFFIXES)}) or a folder of cases")
        return [_single_file_case(source)]
    alone = _brats_case(source, order)
    if alone is not None:  # one BraTS case folder given by itself
        return [alone]
    for sub in ("imagesTs", "imagesTr"):  # a dataset folder: its test images, else its training images
        if (source / sub).is_dir() and not [e for e in _entries(source) if e.name not in DATASET_FOLDERS]:
            source = source / sub
            break
    else:
        if _has_dicom(source) and not _entries(source):  # one DICOM series folder given by itself
            return [_single_file_case(source)]
    grouped: dict[str, dict[int, Path]] = {}
    cases: list[CaseFiles] = []
    for entry in _entries(source):
        stem = strip_suffix(entry.name) if entry.is_file() else entry.name
        match = _CHANNEL.match(stem)
        if entry.is_dir() and _brats_case(entry):
            cases.append(_brats_case(entry, order))
        elif entry.is_dir() and _is_study(entry):  # one folder of series per case: channels by description
            cases.append(CaseFiles(entry.name, map_series_to_channels(entry, channel_names or ("image",)), None))
        elif match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = entry
        else:
            cases.append(CaseFiles(stem, (entry,), None))
    problems = []
    for case_id, channels in grouped.items():
        expected = list(range(len(channels)))
        if sorted(channels) != expected:
            problems.append(f"case {case_id}: channel files {sorted(channels)} are not numbered 0..{len(channels) - 1}")
            continue
        cases.append(CaseFiles(case_id, tuple(channels[c] for c in expected), None))
    if problems:
        raise DatasetError(problems)
    if not cases:
        raise DatasetError(f"no images found in {source} (expected NIfTI/NRRD/MHA files or DICOM series folders)")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DatasetError(f"case id(s) {duplicates} appear more than once in {source}")
    return sorted(cases, key=lambda c: c.case_id)


def _single_file_case(path: Path) -> CaseFiles:
    """One file (or DICOM series folder) given alone; ``CASE_0000.nii.gz`` (``CASE_0000/``) stands for
    case ``CASE`` with its channel files (folders) beside it."""
    stem = strip_suffix(path.name)
    match = _CHANNEL.match(stem)
    if not match:
        return CaseFiles(stem, (path,), None)
    suffix = path.name[len(stem) :]
    channels = {
        int(_CHANNEL.match(strip_suffix(p.name))["channel"]): p
        for p in path.parent.glob(f"{glob.escape(match['case'])}_[0-9][0-9][0-9][0-9]{glob.escape(suffix)}")
    }
    if sorted(channels) != list(range(len(channels))):
        raise DatasetError(
            f"case {match['case']}: channel files {sorted(channels)} beside {path.name} "
            f"are not numbered 0..{len(channels) - 1}"
        )
    return CaseFiles(match["case"], tuple(channels[c] for c in sorted(channels)), None)


def _entries(folder: Path) -> list[Path]:
    """Image files and case folders directly inside ``folder``."""
    found = []
    for entry in sorted(folder.iterdir()):
        if is_junk(entry.name):
            continue
        if entry.is_file() and entry.name.lower().endswith(ITK_SUFFIXES):
            found.append(entry)
        elif entry.is_dir() and (_brats_case(entry) or _has_dicom(entry) or _is_study(entry)):
            found.append(entry)
    return found


def _has_dicom(folder: Path) -> bool:
    return any(p.is_file() and (p.suffix.lower() in (".dcm", "") and not is_junk(p.name)) for p in folder.iterdir())


def _is_study(folder: Path) -> bool:
    """A case folder of DICOM series folders (one per channel), holding no image file itself."""
    return not _has_dicom(folder) and any(
        p.is_dir() and not is_junk(p.name) and _has_dicom(p) for p in folder.iterdir()
    )


def _brats_case(folder: Path, order: Sequence[str] | None = None) -> CaseFiles | None:
    files = {brats_suffix(p.name): p for p in folder.iterdir() if p.is_file() and not is_junk(p.name)}
    images = {key: next((files[s] for s in suffixes if s in files), None) for key, suffixes in BRATS_CHANNELS.items()}
    if None in images.values():
        return None
    return CaseFiles(folder.name, tuple(images[key] for key in (order or BRATS_CHANNELS)), None)
