"""Discover the cases of a dataset folder in any of the layouts autoseg accepts.

Layouts (detected in this order):

* **nnU-Net v2** — ``dataset.json`` with ``channel_names`` (or labels given name -> int),
  channels as ``imagesTr/CASE_0000<ending>`` files or ``imagesTr/CASE_0000/`` DICOM series
  folders, labels as ``labelsTr/CASE<ending>`` (or a ``labelsTr/CASE/`` series folder).
* **Medical Segmentation Decathlon** — ``dataset.json`` with ``modality`` and labels
  int -> name; one (usually 4D) image per case listed under ``training``.
* **BraTS** — no ``dataset.json``; one folder per case holding ``<case>_flair``,
  ``_t1``, ``_t1ce``, ``_t2`` and ``_seg`` files (BraTS 2023 names ``-t2f``, ``-t1n``,
  ``-t1c``, ``-t2w``, ``-seg`` work too). Labels 1/2/4 (or 1/2/3) become consecutive.

Discovery only looks at names; reading and checking the voxels is the job of
:mod:`autoseg.data.preprocessing.fingerprint`, which reports every bad case at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.core.errors import DatasetError
from autoseg.core.files import read_json
from autoseg.core.plan import Region
from autoseg.data.io.images import ITK_SUFFIXES, strip_suffix


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: one path per channel, or a single 4D file holding all channels."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset declares: channels, labels, regions and its cases."""

    name: str
    root: Path
    layout: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    cases: tuple[CaseFiles, ...]
    #: raw value in the label files -> consecutive training value (identity when absent).
    label_mapping: dict[int, int] = field(default_factory=dict)
    regions: tuple[Region, ...] = ()
    #: problems of single cases found from file names alone; those cases are not in ``cases``.
    problems: tuple[str, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def map_raw_label(self, value: int) -> int | None:
        """Consecutive value of a raw file value, or None if the dataset does not declare it."""
        if self.label_mapping:
            return self.label_mapping.get(value)
        return value if value in self.labels.values() else None

    def consecutive_labels(self, raw: np.ndarray) -> np.ndarray:
        """Map a raw label array to training values (identity unless the layout remaps, e.g. BraTS)."""
        return remap_labels(raw, self.label_mapping) if self.label_mapping else raw


def remap_labels(labels: np.ndarray, mapping: Mapping[int, int], dtype: type = np.int16) -> np.ndarray:
    """``labels`` with each value replaced by ``mapping[value]``, in one table lookup.

    The one label remap of the package: raw dataset values to training values, BraTS files to
    consecutive values in ``evaluate``, training values to the dataset's own in predictions.
    Values ``mapping`` lacks become 0, so callers refuse undeclared values before remapping.
    """
    table = np.zeros(max(max(mapping), int(labels.max(initial=0))) + 1, dtype)
    for value, target in mapping.items():
        table[value] = target
    return table[labels]


BRATS_CHANNELS = {
    "FLAIR": ("flair", "t2f"),
    "T1": ("t1", "t1n"),
    "T1ce": ("t1ce", "t1c"),
    "T2": ("t2", "t2w"),
}
BRATS_LABELS = {"background": 0, "edema": 1, "non-enhancing tumor core": 2, "enhancing tumor": 3}
#: BraTS 2017-2021 use 1 NCR/NET, 2 ED, 4 ET; BraTS 2023 uses 3 for ET.
BRATS_MAPPING = {0: 0, 1: 2, 2: 1, 3: 3, 4: 3}
BRATS_REGIONS = (
    Region("whole tumor", [1, 2, 3], 1),
    Region("tumor core", [2, 3], 2),
    Region("enhancing tumor", [3], 3),
)


def discover_dataset(root: Path, keep_case_problems: bool = False) -> DatasetSpec:
    """Detect the layout of ``root`` and list its cases; raise DatasetError with every problem.

    With ``keep_case_problems``, problems of single cases (a missing file) are returned in
    ``spec.problems`` instead, so the caller can check the other cases' voxels first and
    report everything at once.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = read_json(meta_path)
        except (ValueError, OSError) as exc:
            raise DatasetError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path} must hold a JSON object")
        if "channel_names" in meta or labels_are_name_to_int(meta.get("labels")):
            spec = _nnunet_dataset(root, meta)
        elif "modality" in meta:
            spec = _msd_dataset(root, meta)
        else:
            raise DatasetError(
                f"{meta_path} is neither nnU-Net v2 (needs 'channel_names') nor MSD (needs 'modality') style"
            )
    else:
        spec = _brats_dataset(root)
    dataset_level = [p for p in spec.problems if not p.startswith("case ")]
    if spec.problems and (dataset_level or not keep_case_problems or not spec.cases):
        raise DatasetError(list(spec.problems))
    if not spec.cases:
        raise DatasetError(f"no training cases found in {root} ({spec.layout} layout)")
    return spec


def labels_are_name_to_int(labels) -> bool:
    return isinstance(labels, dict) and bool(labels) and all(isinstance(v, (int, list)) for v in labels.values())


def is_junk(name: str) -> bool:
    """macOS resource forks and hidden files shipped inside the MSD archives."""
    return name.startswith((".", "_"))


def _channel_names(meta: dict, key: str, problems: list[str]) -> tuple[str, ...]:
    """Channel names ordered by their keys '0', '1', ...; every other shape is a problem."""
    channels = meta.get(key)
    if not isinstance(channels, dict) or not channels:
        problems.append(f"dataset.json: '{key}' must map '0', '1', ... to channel names")
        return ()
    if sorted(channels, key=str) != sorted(str(i) for i in range(len(channels))):
        problems.append(f"dataset.json: '{key}' keys must be '0', '1', ..., got {sorted(channels)}")
        return ()
    return tuple(str(channels[str(i)]) for i in range(len(channels)))


def _listed_path(root: Path, listed: object, what: str, problems: list[str]) -> Path | None:
    """A path from dataset.json: relative to the dataset folder, or absolute.

    It may lead outside the folder (``../store/x.nii.gz``), as a symlink in ``imagesTr`` may:
    data are often kept in one shared store and indexed by several dataset folders, and
    autoseg only reads them (see docs/datasets.md, "Where case files may live").
    """
    if not isinstance(listed, str) or not listed:
        problems.append(f"{what}: path {listed!r} in dataset.json is not a file path")
        return None
    return Path(os.path.normpath(root / listed))


# --------------------------------------------------------------------------- nnU-Net v2


def nnunet_labels(meta: dict, problems: list[str]) -> tuple[dict[str, int], tuple[Region, ...]]:
    """Labels name -> int; a list value anywhere switches to nnU-Net's region mode."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        problems.append("dataset.json: 'labels' must map label names to integers")
        return {}, ()
    entries: dict[str, tuple[int, ...]] = {}
    for name, value in raw.items():
        if isinstance(value, int) and not isinstance(value, bool):
            entries[name] = (value,)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            entries[name] = tuple(value)
        else:
            problems.append(f"dataset.json: label {name!r} has value {value!r}; expected an int or a list of ints")
    if entries.get("background") != (0,):
        problems.append("dataset.json: labels must declare 'background': 0")
    regions: tuple[Region, ...] = ()
    if any(len(v) > 1 for v in entries.values()):
        declared = [(n, v) for n, v in entries.items() if n not in ("background", "ignore")]
        order = meta.get("regions_class_order")
        if not isinstance(order, list) or len(order) != len(declared):
            problems.append("dataset.json: region labels need 'regions_class_order' with one label per region")
            order = [min(v) for _, v in declared]
        regions = tuple(Region(n, list(v), int(p)) for (n, v), p in zip(declared, order))
        labels = {"background": 0} | {f"label {v}": v for v in sorted({v for _, vs in declared for v in vs})}
        if "ignore" in entries:
            labels["ignore"] = entries["ignore"][0]
    else:
        labels = {n: v[0] for n, v in entries.items()}
    values = sorted(v for n, v in labels.items() if n != "ignore")
    if values != list(range(len(values))):
        problems.append(f"dataset.json: label values must be consecutive integers from 0, got {values}")
    return labels, regions


def _nnunet_dataset(root: Path, meta: dict) -> DatasetSpec:
    problems: list[str] = []
    channel_names = _channel_names(meta, "channel_names" if "channel_names" in meta else "modality", problems)
    labels, regions = nnunet_labels(meta, problems)
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or not ending:
        problems.append("dataset.json: 'file_ending' is required (e.g. \".nii.gz\")")
        ending = ".nii.gz"
    if "dataset" in meta:
        cases = _explicit_cases(root, meta["dataset"], problems)
    else:
        cases = _nnunet_cases(root, ending, len(channel_names), problems)
    n_declared = meta.get("numTraining")
    bad_cases = {p.split(":")[0] for p in problems if p.startswith("case ")}
    n_found = len(cases) + len(bad_cases)
    if isinstance(n_declared, int) and n_found and n_declared != n_found:
        problems.append(f"dataset.json: numTraining is {n_declared} but {n_found} cases were found")
    return DatasetSpec(
        root.name, root, "nnunet", channel_names, labels, tuple(cases), regions=regions, problems=tuple(problems)
    )


def _nnunet_cases(root: Path, ending: str, n_channels: int, problems: list[str]) -> list[CaseFiles]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        problems.append(f"{images_dir} is missing")
        return []
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}})(?:{re.escape(ending)})?$")
    found: dict[str, dict[int, Path]] = {}
    for entry in sorted(images_dir.iterdir()):
        if is_junk(entry.name) or not (entry.is_dir() or entry.name.endswith(ending)):
            continue
        match = pattern.match(entry.name)
        if match is None or (entry.is_file() and not entry.name.endswith(ending)):
            problems.append(f"imagesTr/{entry.name}: name is not CASE_XXXX{ending}")
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = entry
    cases = []
    for case_id, by_channel in sorted(found.items()):
        missing = [f"{c:04d}" for c in range(n_channels) if c not in by_channel]
        if missing:
            problems.append(f"case {case_id}: missing channel file(s) {', '.join('_' + m for m in missing)}")
            continue
        extra = sorted(set(by_channel) - set(range(n_channels)))
        if extra:
            problems.append(f"case {case_id}: channel(s) {extra} not declared in channel_names")
            continue
        label = labels_dir / f"{case_id}{ending}"
        if not label.exists() and (labels_dir / case_id).is_dir():
            label = labels_dir / case_id
        if not label.exists():
            problems.append(f"case {case_id}: label file labelsTr/{case_id}{ending} is missing")
            continue
        cases.append(CaseFiles(case_id, tuple(by_channel[c] for c in range(n_channels)), label))
    return cases


def _explicit_cases(root: Path, listing, problems: list[str]) -> list[CaseFiles]:
    if not isinstance(listing, dict):
        problems.append("dataset.json: 'dataset' must map case ids to {'images': [...], 'label': ...}")
        return []
    cases = []
    for case_id, entry in sorted(listing.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("images", []), list):
            problems.append(f"case {case_id}: dataset.json entry must be {{'images': [...], 'label': ...}}")
            continue
        images = [_listed_path(root, p, f"case {case_id}", problems) for p in entry.get("images", [])]
        label = _listed_path(root, entry["label"], f"case {case_id}", problems) if "label" in entry else None
        if not images or None in images or label is None:
            if not images or "label" not in entry:
                problems.append(f"case {case_id}: needs 'images' and 'label' in dataset.json")
            continue
        cases.append(CaseFiles(case_id, tuple(images), label))
    return [c for c in cases if _files_exist(c, root, problems)]


def _files_exist(case: CaseFiles, root: Path, problems: list[str]) -> bool:
    missing = [
        (p.relative_to(root) if p.is_relative_to(root) else p).as_posix()
        for p in (*case.images, case.label)
        if p is not None and not p.exists()
    ]
    for name in missing:
        problems.append(f"case {case.case_id}: file {name} is missing")
    return not missing


# --------------------------------------------------------------------------- MSD


def _msd_dataset(root: Path, meta: dict) -> DatasetSpec:
    problems: list[str] = []
    channel_names = _channel_names(meta, "modality", problems)
    raw_labels = meta.get("labels")
    labels: dict[str, int] = {}
    if not isinstance(raw_labels, dict) or not raw_labels or not all(str(k).isdigit() for k in raw_labels):
        problems.append("dataset.json: MSD 'labels' must map '0', '1', ... to label names")
    else:
        labels = {str(name): int(value) for value, name in raw_labels.items()}
        values = sorted(labels.values())
        if values != list(range(len(values))):
            problems.append(f"dataset.json: label values must be consecutive integers from 0, got {values}")
    training = meta.get("training")
    cases = []
    if isinstance(training, list):
        for i, entry in enumerate(training):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                problems.append(f"dataset.json: training entry {i} needs 'image' and 'label'")
                continue
            if not isinstance(entry["image"], str) or not isinstance(entry["label"], str):
                problems.append(f"dataset.json: training entry {i} needs file paths as 'image' and 'label'")
                continue
            if is_junk(Path(entry["image"]).name):
                continue
            case_id = strip_suffix(Path(entry["image"]).name)
            image = _listed_path(root, entry["image"], f"case {case_id}", problems)
            label = _listed_path(root, entry["label"], f"case {case_id}", problems)
            if image is not None and label is not None:
                cases.append(CaseFiles(case_id, (image,), label))
    elif training is not None:
        problems.append("dataset.json: 'training' must be a list of {'image': ..., 'label': ...} entries")
    else:
        images_dir = root / "imagesTr"
        for path in sorted(images_dir.glob("*")) if images_dir.is_dir() else []:
            if not is_junk(path.name) and path.name.lower().endswith(ITK_SUFFIXES):
                cases.append(CaseFiles(strip_suffix(path.name), (path,), root / "labelsTr" / path.name))
    cases = [c for c in sorted(cases, key=lambda c: c.case_id) if _files_exist(c, root, problems)]
    return DatasetSpec(root.name, root, "msd", channel_names, labels, tuple(cases), problems=tuple(problems))


# --------------------------------------------------------------------------- BraTS


def _brats_dataset(root: Path) -> DatasetSpec:
    problems: list[str] = []
    cases = []
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not is_junk(p.name)]
    for folder in folders:
        files = {brats_suffix(p.name): p for p in folder.iterdir() if p.is_file() and not is_junk(p.name)}
        files.pop(None, None)
        if not files:
            continue
        images = []
        for channel, suffixes in BRATS_CHANNELS.items():
            path = next((files[s] for s in suffixes if s in files), None)
            if path is None:
                problems.append(f"case {folder.name}: missing the {channel} file ({' or '.join(suffixes)})")
            images.append(path)
        if "seg" not in files:
            problems.append(f"case {folder.name}: missing the segmentation file (<case>_seg)")
        if None not in images and "seg" in files:
            cases.append(CaseFiles(folder.name, tuple(images), files["seg"]))
    if not cases and not problems:
        raise DatasetError(
            f"{root} has no dataset.json and no BraTS case folders; expected an MSD or nnU-Net v2 "
            "dataset.json, or one folder per case with <case>_flair/_t1/_t1ce/_t2/_seg files"
        )
    return DatasetSpec(
        root.name,
        root,
        "brats",
        tuple(BRATS_CHANNELS),
        dict(BRATS_LABELS),
        tuple(cases),
        label_mapping=dict(BRATS_MAPPING),
        regions=BRATS_REGIONS,
        problems=tuple(problems),
    )


def brats_channel_order(channel_names: Sequence[str]) -> tuple[str, ...] | None:
    """The :data:`BRATS_CHANNELS` key of each named channel (``T1w`` -> ``T1``, ``t1gd`` -> ``T1ce``),
    or None unless the names are the four BraTS sequences, each once.

    A model planned from another layout names its channels its own way (MSD: FLAIR, T1w, t1gd,
    T2w; an nnU-Net dataset in any order); BraTS case folders are fed to it in that order.
    """
    keys = [brats_channel_key(name) for name in channel_names]
    return tuple(keys) if None not in keys and sorted(keys) == sorted(BRATS_CHANNELS) else None


def brats_channel_key(name: str) -> str | None:
    """The :data:`BRATS_CHANNELS` key one channel or sequence name stands for, or None."""
    n = re.sub(r"[^a-z0-9]", "", name.lower())
    if "flair" in n or n == "t2f":
        return "FLAIR"
    if n.startswith("t1") and any(k in n for k in ("ce", "gd", "contrast", "post")) or n == "t1c":
        return "T1ce"
    if n in ("t1", "t1w", "t1n", "t1native"):
        return "T1"
    if n in ("t2", "t2w"):
        return "T2"
    return None


def brats_suffix(name: str) -> str | None:
    stem = strip_suffix(name)
    if stem == name:
        return None
    suffix = re.split(r"[_-]", stem)[-1].lower()
    known = {s for options in BRATS_CHANNELS.values() for s in options} | {"seg"}
    return suffix if suffix in known else None
