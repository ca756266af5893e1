"""The work folder's ``dataset.json``: where the raw data live and how to read them.

Written by ``autoseg plan``; read back by training (full-volume validation) and
prediction so that no later stage has to rediscover the raw dataset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from autoseg.core.errors import WorkspaceError
from autoseg.core.files import read_json_or_raise
from autoseg.core.plan import Region
from autoseg.data.io.datasets import CaseFiles, DatasetSpec

DATASET_RECORD_VERSION = 1


def dataset_record(spec: DatasetSpec) -> dict:
    return {
        "version": DATASET_RECORD_VERSION,
        "name": spec.name,
        "source": str(spec.root),
        "layout": spec.layout,
        "channel_names": list(spec.channel_names),
        "labels": spec.labels,
        "label_mapping": {str(k): v for k, v in spec.label_mapping.items()},
        "regions": [dataclasses.asdict(r) for r in spec.regions],
        "cases": {c.case_id: {"images": [str(p) for p in c.images], "label": str(c.label)} for c in spec.cases},
    }


def load_dataset_record(path: Path) -> DatasetSpec:
    return dataset_from_record(read_json_or_raise(path, WorkspaceError, fix="run `autoseg plan` again"), str(path))


def dataset_from_record(record: object, where: str) -> DatasetSpec:
    """The dataset a ``dataset.json`` record describes; a record of another version or shape is refused."""
    version = record.get("version") if isinstance(record, dict) else None
    if version != DATASET_RECORD_VERSION:
        raise WorkspaceError(f"{where} has version {version}; run `autoseg plan` again")
    try:
        cases = tuple(
            CaseFiles(case_id, tuple(Path(p) for p in c["images"]), Path(c["label"]) if c.get("label") else None)
            for case_id, c in record["cases"].items()
        )
        return DatasetSpec(
            name=record["name"],
            root=Path(record["source"]),
            layout=record["layout"],
            channel_names=tuple(record["channel_names"]),
            labels=dict(record["labels"]),
            cases=cases,
            label_mapping={int(k): int(v) for k, v in record["label_mapping"].items()},
            regions=tuple(Region.from_json(r) for r in record["regions"]),
        )
    except KeyError as exc:
        raise WorkspaceError(f"{where} has no {exc.args[0]!r}; run `autoseg plan` again") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise WorkspaceError(f"{where} is malformed ({exc}); run `autoseg plan` again") from exc
