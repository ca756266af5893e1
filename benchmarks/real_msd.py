"""Real MSD data for the benchmarks' ``--real`` modes: a seeded split of an MSD task's training cases, written
as MSD-layout folders that autoseg plans like any dataset.

The images are symlinks to the originals (never copied, never changed); label files are symlinks too,
unless labels are merged, then they are rewritten with nibabel in the original's header (so a float32
label file stays float32, as real data come). Held-out cases go to ``imagesTs/`` and ``labelsTs/``,
listed under ``test`` as in MSD, so ``autoseg plan`` leaves them out and ``evaluate`` can score them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def msd_cases(data: Path) -> list[str]:
    """The training case ids of an MSD task folder, sorted (from its dataset.json)."""
    manifest = json.loads((Path(data) / "dataset.json").read_text(encoding="utf-8"))
    return sorted(Path(entry["label"]).name.removesuffix(".nii.gz") for entry in manifest["training"])


def shuffled_cases(data: Path, seed: int) -> list[str]:
    """The task's cases in a fixed random order (``seed``): the benchmarks' splits are slices of it."""
    cases = msd_cases(data)
    return [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]


def write_msd_subset(
    data: Path,
    target: Path,
    training: Sequence[str],
    held_out: Sequence[str] = (),
    merge: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """An MSD folder at ``target`` (its name is the dataset's) with ``training`` cases in imagesTr/labelsTr and
    ``held_out`` in imagesTs/labelsTs. ``merge``: new label name -> the original values it covers (numbered
    from 1 in the given order); the other values become background."""
    data, target = Path(data).resolve(), Path(target)
    manifest = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    labels = manifest["labels"]
    if merge is not None:
        labels = {"0": labels["0"]} | {str(i + 1): name for i, name in enumerate(merge)}
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for cases, images, truth in ((training, "imagesTr", "labelsTr"), (held_out, "imagesTs", "labelsTs")):
        for case in cases:
            (target / images / f"{case}.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
            source = data / "labelsTr" / f"{case}.nii.gz"
            if merge is None:
                (target / truth / f"{case}.nii.gz").symlink_to(source)
            else:
                _write_merged(source, target / truth / f"{case}.nii.gz", merge)
    record = {k: v for k, v in manifest.items() if k not in ("training", "test", "numTraining", "numTest", "_note")}
    record |= {
        "name": target.name,
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(held_out),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in training],
        "test": [f"./imagesTs/{c}.nii.gz" for c in held_out],
    }
    (target / "dataset.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return target


def _write_merged(source: Path, target: Path, merge: Mapping[str, Sequence[int]]) -> None:
    import nibabel as nib

    image = nib.load(source)
    values = np.asanyarray(image.dataobj)
    merged = np.zeros(values.shape, np.uint8)
    for new, originals in enumerate(merge.values(), start=1):
        merged[np.isin(values, list(originals))] = new
    nib.save(nib.Nifti1Image(merged.astype(image.get_data_dtype()), image.affine, image.header), target)
