"""Read every case once: validate it and record what planning needs.

One pass over the data does both jobs, so a dataset is decompressed once before
planning. Nothing is written unless every case passes; the DatasetError then lists
every bad case with its problem.

``fingerprint.json`` (version 2) holds, per case, the spacing, the shape before and
after cropping to the non-zero region, the voxel count per label and (new in version 2)
``body_intensities``: per channel, the ``BODY_QUANTILES`` of the intensities inside the
body (the non-zero region), which ``predict``'s quality control compares new cases with
(:mod:`autoseg.data.qc.flags`); per channel, the statistics of foreground intensities pooled over
a fixed-seed sample of ``SAMPLES_PER_CASE`` voxels drawn (with replacement) from every
case, so every case weighs the same; and the median relative size after cropping.
Version 1 files (and the reference fingerprints in ``plans/``) still load; they only lack
``body_intensities``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.core.errors import DatasetError, PlanError
from autoseg.core.files import read_json_or_raise, write_json
from autoseg.core.parallel import WorkerPeak, parallel_map
from autoseg.data.io.datasets import CaseFiles, DatasetSpec
from autoseg.data.io.images import describe_nonfinite, read_channels, read_label
from autoseg.data.preprocessing.cropping import crop, nonzero_bbox

FINGERPRINT_VERSION = 2
#: Versions :func:`load_fingerprint` reads: version 1 lacks the per-case ``body_intensities``.
READABLE_VERSIONS = (1, 2)
#: Foreground voxels sampled per case and channel. nnU-Net draws 1e8/n_cases; the
#: percentiles it needs are stable to <0.5 % with far fewer, at a fraction of the memory.
SAMPLES_PER_CASE = 20_000
STAT_KEYS = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")
#: Quantile levels of each channel's body intensities recorded per case (fingerprint version 2).
BODY_QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)


@dataclass
class CaseResult:
    """What a worker learned about one case: a record and samples, or its problems."""

    case_id: str
    record: dict[str, Any] | None
    samples: np.ndarray | None
    problems: list[str]


def content_hash(spec: DatasetSpec, workers: int = 1, show_progress: bool = True) -> str:
    """Hash of every byte of every case file plus dataset.json: equal hashes mean equal data."""
    digests = dict(parallel_map(_hash_case, spec.cases, workers, "Hashing files", show_progress))
    total = hashlib.blake2b(digest_size=16)
    total.update(f"fingerprint-v{FINGERPRINT_VERSION}".encode())
    meta = spec.root / "dataset.json"
    if meta.is_file():
        total.update(meta.read_bytes())
    for case_id in sorted(digests):
        total.update(f"{case_id}:{digests[case_id]}".encode())
    return total.hexdigest()


def _hash_case(case: CaseFiles) -> tuple[str, str]:
    digest = hashlib.blake2b(digest_size=16)
    for path in (*case.images, case.label):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
    return case.case_id, digest.hexdigest()


def fingerprint_case(case: CaseFiles, spec: DatasetSpec) -> CaseResult:
    """Read, validate and summarise one case (runs in a worker process)."""
    problems: list[str] = []
    where = f"case {case.case_id}"
    try:
        data, geometry = read_channels(case.images)
    except Exception as exc:  # any reader failure is a problem of this case, reported by name
        return CaseResult(case.case_id, None, None, [f"{where}: cannot read image: {_reason(exc)}"])
    if data.shape[0] != spec.num_channels:
        problems.append(f"{where}: image has {data.shape[0]} channel(s), dataset.json declares {spec.num_channels}")
    nonfinite = describe_nonfinite(data)
    if nonfinite:
        problems.append(f"{where}: image has {nonfinite}")
    try:
        raw_label, label_geometry = read_label(case.label)
    except Exception as exc:
        problems.append(f"{where}: cannot read label {_reason(exc)}")  # the reason starts with the file name
        return CaseResult(case.case_id, None, None, problems)
    mismatch = geometry.mismatches(label_geometry)
    if mismatch:
        problems.append(f"{where}: label does not match the image: {'; '.join(mismatch)}")
    values, value_counts = np.unique(raw_label, return_counts=True)
    raw_values = [int(v) for v in values]
    undeclared = [v for v in raw_values if spec.map_raw_label(v) is None]
    if undeclared:
        problems.append(f"{where}: label values {undeclared} are not declared in the dataset's labels")
    if problems:
        return CaseResult(case.case_id, None, None, problems)

    label = spec.consecutive_labels(raw_label)
    box = nonzero_bbox(np.any(data != 0, axis=0))
    cropped, cropped_label = crop(data, box), crop(label, box)
    voxels: dict[int, int] = {}
    for value, count in zip(raw_values, value_counts):
        target = spec.map_raw_label(value)
        if target > 0:
            voxels[target] = voxels.get(target, 0) + int(count)
    foreground = cropped_label > 0
    samples = _sample_foreground(cropped, foreground, case.case_id)
    record = {
        "spacing": list(geometry.spacing),
        "shape_before_crop": list(geometry.shape),
        "shape_after_crop": list(cropped.shape[1:]),
        "bbox": [list(b) for b in box],
        "label_voxels": {str(v): voxels[v] for v in sorted(voxels)},
        "raw_label_values": raw_values,
        "constant_channels": constant_channels(data),
        "body_intensities": body_quantiles(cropped, case.case_id).tolist(),
    }
    return CaseResult(case.case_id, record, samples, [])


def constant_channels(data: np.ndarray) -> list[int]:
    """Channels holding one value everywhere (e.g. a missing sequence saved as zeros)."""
    flat = data.reshape(data.shape[0], -1)
    return [int(c) for c in np.nonzero(flat.min(axis=1) == flat.max(axis=1))[0]]


def dataset_warnings(fingerprint: dict[str, Any]) -> list[str]:
    """What is valid but doubtful about a dataset: label maps with nothing to learn, labels that no
    case holds, constant channels. Planning goes on; the user is told."""
    cases = fingerprint["cases"]
    warnings = []
    present = {int(v) for record in cases.values() for v, n in record.get("label_voxels", {}).items() if n}
    if not present:
        warnings.append(
            f"every label map of the {len(cases)} case(s) is background only: a network trained on "
            "them learns to predict background everywhere"
        )
    else:
        ignore = fingerprint["labels"].get("ignore")
        absent = [
            f"{v} ({name})" for name, v in fingerprint["labels"].items() if v > 0 and v != ignore and v not in present
        ]
        if absent:
            warnings.append(
                f"label(s) {', '.join(absent)} appear in no case's label map: the network can never "
                "learn to predict them"
            )
    for c, name in enumerate(fingerprint["channel_names"]):
        flat = sorted(case for case, record in cases.items() if c in record.get("constant_channels", ()))
        if flat:
            where = (
                "every case"
                if len(flat) == len(cases)
                else f"{len(flat)} case(s) ({', '.join(flat[:5])}{', ...' if len(flat) > 5 else ''})"
            )
            warnings.append(
                f"channel {c} ({name}) holds one constant value in {where}: it carries no information "
                "there (a missing or blank scan?)"
            )
    return warnings


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _sample_foreground(data: np.ndarray, foreground: np.ndarray, case_id: str) -> np.ndarray:
    """``(C, SAMPLES_PER_CASE)`` intensities drawn with replacement; empty if no foreground."""
    values = data[:, foreground]
    if values.shape[1] == 0:
        return np.zeros((data.shape[0], 0), np.float32)
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    return values[:, rng.integers(0, values.shape[1], SAMPLES_PER_CASE)]


def body_quantiles(data: np.ndarray, case_id: str) -> np.ndarray:
    """``(C, len(BODY_QUANTILES))``: each channel's intensity quantiles inside the body (voxels non-zero in
    any channel, the region preprocessing crops to), from a fixed-seed sample, so training cases and a
    new case are described the same way; zeros for an image with no non-zero voxel."""
    values = _sample_foreground(data, np.any(data != 0, axis=0), case_id)
    if values.shape[1] == 0:
        return np.zeros((data.shape[0], len(BODY_QUANTILES)))
    return np.quantile(values, BODY_QUANTILES, axis=1).T


def channel_statistics(samples: np.ndarray) -> dict[str, float]:
    """The foreground intensity statistics planning uses (CT normalisation)."""
    if samples.size == 0:
        return {k: 0.0 for k in STAT_KEYS}
    p005, median, p995 = np.percentile(samples, [0.5, 50.0, 99.5])
    return {
        "mean": float(np.mean(samples)),
        "std": float(np.std(samples)),
        "median": float(median),
        "min": float(np.min(samples)),
        "max": float(np.max(samples)),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
    }


def compute_fingerprint(
    spec: DatasetSpec, workers: int = 1, show_progress: bool = True, data_hash: str = "", peak: WorkerPeak | None = None
) -> dict[str, Any]:
    """Fingerprint every case in parallel; raise DatasetError listing every bad case."""
    from functools import partial

    results = list(
        parallel_map(
            partial(fingerprint_case, spec=spec), spec.cases, workers, "Reading and checking cases", show_progress, peak
        )
    )
    problems = list(spec.problems) + [p for r in sorted(results, key=lambda r: r.case_id) for p in r.problems]
    if problems:
        raise DatasetError(problems, header=f"The dataset {spec.name} has problems")
    results.sort(key=lambda r: r.case_id)
    samples = np.concatenate([r.samples for r in results], axis=1)
    before = np.array([np.prod(r.record["shape_before_crop"]) for r in results], dtype=np.float64)
    after = np.array([np.prod(r.record["shape_after_crop"]) for r in results], dtype=np.float64)
    return {
        "version": FINGERPRINT_VERSION,
        "dataset": spec.name,
        "source": str(spec.root),
        "layout": spec.layout,
        "content_hash": data_hash,
        "channel_names": list(spec.channel_names),
        "labels": dict(spec.labels),
        "label_mapping": {str(k): v for k, v in spec.label_mapping.items()},
        "regions": [dataclasses.asdict(r) for r in spec.regions],
        "cases": {r.case_id: r.record for r in results},
        "foreground_intensities": [channel_statistics(samples[c]) for c in range(samples.shape[0])],
        "median_relative_size_after_crop": float(np.median(after / before)),
    }


REQUIRED_KEYS = (
    "version",
    "channel_names",
    "labels",
    "cases",
    "foreground_intensities",
    "median_relative_size_after_crop",
)
REQUIRED_CASE_KEYS = ("spacing", "shape_after_crop")


def load_fingerprint(path: Path) -> dict[str, Any]:
    """Read and check a fingerprint file (own or a reference one in ``plans/``)."""
    return fingerprint_from_json(read_json_or_raise(path, PlanError, "fingerprint"), str(path))


def fingerprint_from_json(data: Any, where: str) -> dict[str, Any]:
    """Check a fingerprint document; ``where`` names it in the messages."""
    if not isinstance(data, dict):
        raise PlanError(f"fingerprint {where} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise PlanError(f"fingerprint {where} lacks key(s) {missing}")
    if data["version"] not in READABLE_VERSIONS:
        raise PlanError(
            f"fingerprint {where} has version {data['version']}; this autoseg reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    for case_id, record in data["cases"].items():
        lacking = [k for k in REQUIRED_CASE_KEYS if k not in record]
        if lacking:
            raise PlanError(f"fingerprint {where}: case {case_id} lacks {lacking}")
    return data


def anonymised_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint a shared model carries (for the QC flags of ``predict -m``): every per-case
    number, but no case name, no path of the raw data and no content hash of it."""
    cases = [fingerprint["cases"][case_id] for case_id in sorted(fingerprint["cases"])]
    return {
        **fingerprint,
        "source": "",
        "content_hash": "",
        "cases": {f"case_{index:04d}": record for index, record in enumerate(cases)},
    }


def save_fingerprint(path: Path, fingerprint: dict[str, Any]) -> None:
    write_json(path, fingerprint)
