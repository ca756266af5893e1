"""How often `predict`'s quality-control flags fire on real data: in-distribution cases and faults.

The QC flags compare a case with the training cases' fingerprint only (body intensity quantiles,
spacing, field of view, structure volumes), so no network is trained: the dataset's cases are split
into ``--folds`` cross-validation folds; for each fold the reference is built from the other folds'
fingerprint records (as `predict` builds it from fingerprint.json) and every held-out case is assessed
as `predict` would assess it, with its true labels standing in for the prediction (the volume flags
then see a perfect mask). The same held-out cases, changed on purpose, must be flagged:

* ``scaled_x10``: every intensity times 10 (another scanner's unit): must NOT be flagged for MRI;
* ``heavy_noise``: Gaussian noise with the standard deviation of the body's intensities (SNR 1);
* ``three_mm``: resampled to 3 mm voxels (3 mm data for a 1 mm model);
* ``ct``: a real CT volume (``--ct``), as given (3 mm) and resampled to 1 mm and cropped to the
  training cases' median field of view (so only its intensities can tell);
* ``wrong_body_part``: a real MR volume of another body part (``--other-mr``) resampled to 1 mm,
  cropped at several places to the training cases' median field of view.

A channel swap needs several channels; the hippocampus data have one (tests/test_qc.py swaps the
channels of 4-channel phantoms whose scaling varies per case). Prints one JSON object.

    python benchmarks/bench_qc_real.py ../shared/data/Task04_Hippocampus \\
        --ct ../shared/data/totalsegmentator-examples/example_ct_sm.nii.gz \\
        --other-mr ../shared/data/totalsegmentator-examples/example_mr_sm.nii.gz
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg.core.geometry import Geometry  # noqa: E402
from autoseg.data.io.datasets import discover_dataset  # noqa: E402
from autoseg.data.io.images import read_channels  # noqa: E402
from autoseg.data.preprocessing.fingerprint import body_quantiles, compute_fingerprint  # noqa: E402
from autoseg.data.qc.flags import assess_case, structure_volumes, training_reference  # noqa: E402

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def geometry(shape, spacing) -> Geometry:
    return Geometry(tuple(int(s) for s in shape), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), IDENTITY)


def structures_of(fingerprint: dict) -> dict[str, tuple[int, tuple[int, ...]]]:
    labels = {n: v for n, v in fingerprint["labels"].items() if v > 0 and n not in ("ignore", "background")}
    return {name: (value, (value,)) for name, value in labels.items()}


def flags_of(image: np.ndarray, geo: Geometry, labels, structures, reference, names, case_id: str) -> list[str]:
    voxel_ml = float(np.prod(geo.spacing)) / 1000.0
    if labels is None:
        labels = np.zeros(geo.shape, np.uint8)
    entry = assess_case(
        geo,
        body_quantiles(image, case_id),
        names,
        structure_volumes(labels, structures, voxel_ml),
        None,
        reference,
    )
    # the volume flags judge the prediction, not the input: a fault case has no prediction here
    return [f["flag"] for f in entry["flags"]]


def input_flags(flags: list[str]) -> list[str]:
    return [f for f in flags if f not in ("empty_structure", "volume")]


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    return np.stack([ndimage.zoom(c, factor, order=1) for c in image])


def crops(image: np.ndarray, shape, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(count):
        start = [int(rng.integers(0, max(1, n - s + 1))) for n, s in zip(image.shape[1:], shape)]
        out.append(image[(slice(None), *(slice(b, b + int(s)) for b, s in zip(start, shape)))])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="MSD or nnU-Net dataset folder (e.g. Task04_Hippocampus)")
    parser.add_argument("--ct", type=Path, help="a CT volume to give the MRI model")
    parser.add_argument("--other-mr", type=Path, help="an MR volume of another body part")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults-per-fold", type=int, default=8, help="held-out cases changed on purpose per fold")
    args = parser.parse_args()
    started = time.perf_counter()
    spec = discover_dataset(args.data)
    fingerprint = compute_fingerprint(spec, show_progress=False)
    cases = sorted(fingerprint["cases"])
    by_id = {c.case_id: c for c in spec.cases}
    names = list(fingerprint["channel_names"])
    structures = structures_of(fingerprint)
    rng = np.random.default_rng(args.seed)
    order = list(rng.permutation(cases))
    folds = [order[i :: args.folds] for i in range(args.folds)]
    in_distribution: Counter = Counter()
    flagged_cases, held_out = [], 0
    faults = {k: {"tried": 0, "flagged": 0, "flags": Counter()} for k in ("scaled_x10", "heavy_noise", "three_mm")}
    outside = {k: {"tried": 0, "flagged": 0, "flags": Counter()} for k in ("ct_as_given", "ct_1mm", "wrong_body_part")}
    median_shape = np.median([fingerprint["cases"][c]["shape_before_crop"] for c in cases], axis=0).astype(int)
    other_inputs = _outside_inputs(args, median_shape, rng)
    for k, held in enumerate(folds):
        training = {c: fingerprint["cases"][c] for c in cases if c not in held}
        reference = training_reference({**fingerprint, "cases": training}, structures)
        for n, case_id in enumerate(sorted(held)):
            image, geo = read_channels(by_id[case_id].images)
            labels, _ = read_channels([by_id[case_id].label])
            flags = flags_of(image, geo, labels[0].astype(np.uint8), structures, reference, names, case_id)
            held_out += 1
            in_distribution.update(flags)
            if flags:
                flagged_cases.append({"case": case_id, "fold": k, "flags": flags})
            if n < args.faults_per_fold:
                _faults(image, geo, structures, reference, names, case_id, rng, faults)
        for kind, image, geo in other_inputs:
            flags = input_flags(flags_of(image, geo, None, structures, reference, names, kind))
            outside[kind]["tried"] += 1
            outside[kind]["flagged"] += bool(flags)
            outside[kind]["flags"].update(flags)
    report = {
        "benchmark": "qc_real",
        "data": str(args.data),
        "cases": len(cases),
        "folds": args.folds,
        "in_distribution": {
            "held_out": held_out,
            "flagged": len(flagged_cases),
            "rate": len(flagged_cases) / held_out,
            "goal": "at most 1 in 20 (0.05)",
            "flags": dict(in_distribution),
            "flagged_cases": flagged_cases,
        },
        "changed_on_purpose": {k: {**v, "flags": dict(v["flags"])} for k, v in faults.items()},
        "other_inputs": {k: {**v, "flags": dict(v["flags"])} for k, v in outside.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))


def _faults(image, geo, structures, reference, names, case_id, rng, faults) -> None:
    body = image[np.any(image != 0, axis=0)[None].repeat(image.shape[0], 0)]
    noisy = image + rng.normal(0, float(body.std()), image.shape).astype(np.float32)
    coarse = resample(image, 1 / 3)
    changed = {
        "scaled_x10": (image * 10, geo),
        "heavy_noise": (noisy, geo),
        "three_mm": (coarse, geometry(coarse.shape[1:], [3 * s for s in geo.spacing])),
    }
    for kind, (data, g) in changed.items():
        flags = input_flags(flags_of(data, g, None, structures, reference, names, case_id))
        faults[kind]["tried"] += 1
        faults[kind]["flagged"] += bool(flags)
        faults[kind]["flags"].update(flags)


def _outside_inputs(args, median_shape, rng) -> list[tuple[str, np.ndarray, Geometry]]:
    """The CT as given and at 1 mm (cropped), and another body part's MR at 1 mm (cropped at 4 places)."""
    out = []
    if args.ct is not None:
        ct, geo = read_channels([args.ct])
        out.append(("ct_as_given", ct, geo))
        fine = resample(ct, np.array(geo.spacing) / 1.0)
        for crop in crops(fine, median_shape, 2, rng):
            out.append(("ct_1mm", crop, geometry(crop.shape[1:], (1.0, 1.0, 1.0))))
    if args.other_mr is not None:
        mr, geo = read_channels([args.other_mr])
        fine = resample(mr, np.array(geo.spacing) / 1.0)
        for crop in crops(fine, median_shape, 4, rng):
            out.append(("wrong_body_part", crop, geometry(crop.shape[1:], (1.0, 1.0, 1.0))))
    return out


if __name__ == "__main__":
    main()
