"""Resolve what ``autoseg show CASE`` names into a :class:`CaseView` with channel and label names.

CASE may be an image file (3D, or 4D with every channel), a case folder (BraTS, a DICOM
series), a channel set given by its prefix (``imagesTr/BRATS_001`` for
``BRATS_001_0000.nii.gz``, ``_0001``, ...) or the id of a case in a planned dataset.
Names of channels and labels come from the planned dataset or from the ``dataset.json``
beside the images; label files in the BraTS 1/2/4 convention are shown as 1/2/3.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from autoseg.core.errors import AutosegError, DatasetError, WorkspaceError
from autoseg.core.plan import foreground_labels
from autoseg.core.workspace import find_dataset
from autoseg.data.io.dataset_record import load_dataset_record
from autoseg.data.io.datasets import CaseFiles, DatasetSpec, discover_dataset
from autoseg.data.io.images import read_channels, read_label
from autoseg.inference.inputs import find_cases
from autoseg.visual.render import CaseView, check_grid


def load_view(
    case: str,
    *,
    label: Path | None = None,
    prediction: Path | None = None,
    overlay: Path | None = None,
    workdir: Path | None = None,
    dataset: str | None = None,
) -> CaseView:
    """Read CASE's channels, its truth (``label``, else the dataset's label file), ``prediction`` and
    ``overlay`` (a map in [0, 1] on the image's grid, e.g. ``<case>_entropy.nii.gz``)."""
    files, spec = _resolve(case, workdir, dataset)
    try:
        image, geometry = read_channels(files.images)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"case {files.case_id}: cannot read image: {exc}") from exc  # exc names the file
    label = label if label is not None else files.label
    view = CaseView(
        case_id=files.case_id,
        image=image,
        geometry=geometry,
        channel_names=_channel_names(spec, image.shape[0]),
        label_names={v: n for n, v in foreground_labels(spec.labels).items()} if spec else {},
        label=_read_mask(label, files.case_id, "label", spec),
        prediction=_read_mask(prediction, files.case_id, "prediction", spec),
        overlay=_read_overlay(overlay, files.case_id),
    )
    check_grid(view)
    if not view.label_names:  # no dataset.json: name the values found
        found = {int(v) for m in (view.label, view.prediction) if m is not None for v in np.unique(m)}
        view = dataclasses.replace(view, label_names={v: f"label {v}" for v in sorted(found - {0})})
    return view


def _resolve(case: str, workdir: Path | None, dataset: str | None) -> tuple[CaseFiles, DatasetSpec | None]:
    path = Path(case).expanduser()
    if path.is_dir():  # a case folder (BraTS, DICOM series) is one case among its siblings
        sibling = _siblings(path.parent).get(path.name)
        if sibling is not None:
            return _with_dataset_label(sibling, path)
        if any(f.suffix.lower() == ".dcm" for f in path.iterdir()):  # one series folder given alone
            return CaseFiles(path.name, (path,), None), None
    if path.exists():
        cases = find_cases(path)
        if len(cases) > 1:
            ids = ", ".join(c.case_id for c in cases[:5]) + (", ..." if len(cases) > 5 else "")
            raise DatasetError(
                f"{path} holds {len(cases)} cases ({ids}); name one case: a file, a case folder "
                f"or a channel prefix like {path / cases[0].case_id}"
            )
        return _with_dataset_label(cases[0], path if path.is_dir() else path.parent)
    if path.parent.is_dir() and any(path.parent.glob(f"{path.name}_[0-9][0-9][0-9][0-9]*")):
        by_id = {c.case_id: c for c in find_cases(path.parent)}
        if path.name in by_id:
            return _with_dataset_label(by_id[path.name], path.parent)
    return _planned_case(case, workdir, dataset)


def _siblings(folder: Path) -> dict[str, CaseFiles]:
    try:
        return {c.case_id: c for c in find_cases(folder)}
    except DatasetError:  # the parent is no folder of cases: the case folder stands alone
        return {}


def _planned_case(case_id: str, workdir: Path | None, dataset: str | None) -> tuple[CaseFiles, DatasetSpec]:
    from autoseg.core.workspace import default_workdir

    try:
        workspace = find_dataset(workdir if workdir is not None else default_workdir(), dataset)
    except WorkspaceError as exc:
        raise DatasetError(
            f"{case_id!r} is not an image file, a case folder or a channel prefix "
            f"(CASE_0000.nii.gz ...), and not a case id either: {exc}"
        ) from None
    spec = load_dataset_record(workspace.dataset_json)
    by_id = {c.case_id: c for c in spec.cases}
    if case_id not in by_id:
        if not by_id:
            raise DatasetError(
                f"{case_id!r} is not a file, and {workspace.name} lists no cases (an imported "
                "model has none): give the image file"
            )
        more = ", ..." if len(by_id) > 5 else ""
        raise DatasetError(
            f"{case_id!r} is neither a file nor a case of {workspace.name} (cases: {', '.join(list(by_id)[:5])}{more})"
        )
    return by_id[case_id], spec


def _with_dataset_label(files: CaseFiles, folder: Path) -> tuple[CaseFiles, DatasetSpec | None]:
    """Names (and the truth file, for a training case) from the dataset the images sit in, if any.

    ``folder`` holds the images (``imagesTr/``) or is the case folder (BraTS), so the dataset
    root is ``folder`` or its parent.
    """
    brats_case = folder.name == files.case_id
    for root in (folder.parent, folder):
        if not ((root / "dataset.json").is_file() or (brats_case and root == folder.parent)):
            continue
        try:
            spec = discover_dataset(root)
        except AutosegError:
            continue
        known = {c.case_id: c for c in spec.cases}.get(files.case_id)
        return (CaseFiles(files.case_id, files.images, known.label) if known else files), spec
    return files, None


def _channel_names(spec: DatasetSpec | None, count: int) -> tuple[str, ...]:
    if spec is not None and len(spec.channel_names) == count:
        return tuple(spec.channel_names)
    return tuple(f"channel {c}" for c in range(count))


def _read_overlay(path: Path | None, case_id: str) -> np.ndarray | None:
    if path is None:
        return None
    try:
        data, _ = read_channels([Path(path)])
    except (OSError, ValueError) as exc:
        raise DatasetError(f"case {case_id}: cannot read the overlay: {exc}") from exc
    if data.shape[0] != 1:
        raise DatasetError(f"case {case_id}: the overlay {Path(path).name} has {data.shape[0]} channels; give one map")
    return np.clip(data[0], 0.0, 1.0)


def _read_mask(path: Path | None, case_id: str, role: str, spec: DatasetSpec | None):
    if path is None:
        return None
    try:
        mask, _ = read_label(Path(path))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"case {case_id}: cannot read the {role}: {exc}") from exc  # exc names the file
    return spec.consecutive_labels(mask) if spec is not None else mask
