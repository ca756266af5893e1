"""An independent re-implementation of ``autoseg predict`` from ``deployment.json`` and the ONNX models alone.

It imports nothing from autoseg: NumPy, SciPy, nibabel and onnxruntime only, following
docs/deployment.md rule by rule. tests/test_onnx.py runs it as a separate process and compares
its masks with autoseg's, which shows the spec is enough to reproduce a prediction.

    python tests/onnx_reference.py SPEC.json OUTPUT.nii.gz IMAGE.nii.gz [IMAGE_0001.nii.gz ...]

One 4D NIfTI holds every channel (last axis); otherwise give one 3D file per channel, in the
spec's channel order.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
from scipy import ndimage

SUPPORTED_VERSION = 1


def read_image(paths: list[Path]) -> tuple[np.ndarray, list[float], nib.Nifti1Image]:
    """(C, z, y, x) float32, spacing (z, y, x), and the first image (for writing the mask)."""
    images = [nib.load(str(p)) for p in paths]
    if len(images) == 1 and images[0].ndim == 4:
        data = images[0].get_fdata(dtype=np.float32).transpose(3, 2, 1, 0)
    else:
        data = np.stack([image.get_fdata(dtype=np.float32).transpose(2, 1, 0) for image in images])
    spacing = [float(s) for s in reversed(images[0].header.get_zooms()[:3])]
    return np.ascontiguousarray(data), spacing, images[0]


def separate_axis(current: list[float], target: list[float], threshold: float) -> int | None:
    for spacing in (np.asarray(current), np.asarray(target)):
        if spacing.max() / spacing.min() > threshold:
            coarsest = np.flatnonzero(np.isclose(spacing, spacing.max()))
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def zoom(volume: np.ndarray, shape: list[int], order: int) -> np.ndarray:
    """Resample at pixel centres, edges replicated."""
    if list(volume.shape) == list(shape):
        return volume
    factors = [n / o for n, o in zip(shape, volume.shape)]
    return ndimage.zoom(volume.astype(np.float32), factors, order=order, mode="nearest", grid_mode=True)


def resample(volume: np.ndarray, shape: list[int], order: int, axis: int | None, axis_order: int) -> np.ndarray:
    if list(volume.shape) == list(shape):
        return volume
    if axis is None:
        return zoom(volume, shape, order)
    plane = [s for a, s in enumerate(shape) if a != axis]
    slices = [zoom(np.take(volume, k, axis=axis), plane, order) for k in range(volume.shape[axis])]
    stacked = np.stack(slices, axis=axis)
    if axis_order == 0:
        n_in = stacked.shape[axis]
        index = np.clip(np.floor((np.arange(shape[axis]) + 0.5) * n_in / shape[axis]).astype(int), 0, n_in - 1)
        return np.take(stacked, index, axis=axis)
    return zoom(stacked, shape, axis_order)


def normalise(data: np.ndarray, schemes: list[dict], mask: np.ndarray, min_std: float) -> None:
    for x, s in zip(data, schemes):
        if s["scheme"] == "zscore" and s["use_mask"]:
            mean, std = (
                (float(x[mask].mean(dtype=np.float64)), float(x[mask].std(dtype=np.float64)))
                if mask.any()
                else (0.0, 1.0)
            )
            x[...] = (x - mean) / max(std, min_std)
            x[~mask] = 0
        elif s["scheme"] == "zscore":
            x[...] = (x - x.mean()) / max(float(x.std()), min_std)
        elif s["scheme"] == "ct":
            x[...] = (np.clip(x, s["lower"], s["upper"]) - s["mean"]) / max(s["std"], min_std)
        elif s["scheme"] == "rescale":
            x[...] = (x - x.min()) / max(float(x.max() - x.min()), min_std)
        elif s["scheme"] != "none":
            raise SystemExit(f"unknown normalisation {s['scheme']}")


def gaussian(patch: list[int], scale: float) -> np.ndarray:
    weights = np.ones(patch, np.float64)
    for axis, size in enumerate(patch):
        x = np.arange(size) - (size - 1) / 2
        g = np.exp(-0.5 * (x / max(size * scale, 1e-3)) ** 2)
        weights = weights * g.reshape([-1 if a == axis else 1 for a in range(len(patch))])
    weights /= weights.max()
    return np.maximum(weights, weights[weights > 0].min())


def starts(size: int, patch: int, step: float) -> list[int]:
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def activation(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sliding_window(data: np.ndarray, config: dict, sessions: list, num_classes: int) -> np.ndarray:
    window = config["sliding_window"]
    patch, mirror, squeeze = list(window["patch_size"]), list(config["mirroring"]["axes"]), None
    if config["dims"] == 2:  # one slice thick windows; the network sees (y, x)
        patch, mirror, squeeze = [1, *patch], [a + 1 for a in mirror], 2
    spatial = list(data.shape[1:])
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    before = [(p - s) // 2 for p, s in zip(padded, spatial)]
    inner = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    canvas = np.zeros((data.shape[0], *padded), np.float32)
    canvas[(slice(None),) + inner] = data
    weights = gaussian(patch, window["gaussian_sigma_scale"])
    total = np.zeros((num_classes, *padded), np.float64)
    norm = np.zeros(padded, np.float64)
    variants = [c for k in range(len(mirror) + 1) for c in itertools.combinations([a + 2 for a in mirror], k)]
    for start in itertools.product(*(starts(s, p, window["step"]) for s, p in zip(padded, patch))):
        box = tuple(slice(s, s + p) for s, p in zip(start, patch))
        tile = canvas[(slice(None),) + box][None]
        batch = np.concatenate([np.flip(tile, v) if v else tile for v in variants])
        if squeeze is not None:
            batch = batch.squeeze(squeeze)
        mean = 0
        for session in sessions:
            out = activation(
                session.run(None, {config["models"][0]["input"]: np.ascontiguousarray(batch)})[0], config["activation"]
            )
            if squeeze is not None:
                out = np.expand_dims(out, squeeze)
            mean = mean + sum(np.flip(out[i], [a - 1 for a in v]) if v else out[i] for i, v in enumerate(variants))
        mean = mean / (len(variants) * len(sessions))
        total[(slice(None),) + box] += mean * weights
        norm[box] += weights
    return (total / norm)[(slice(None),) + inner].astype(np.float32)


def predict_configuration(
    data: np.ndarray, spacing: list[float], config: dict, spec_dir: Path, num_classes: int
) -> np.ndarray:
    """Probabilities (K, z, y, x) on the input grid."""
    order = config["transpose_forward"]
    data = data.transpose([0] + [a + 1 for a in order]).copy()
    spacing = [spacing[a] for a in order]
    before_crop = list(data.shape[1:])
    nonzero = np.any(data != 0, axis=0)
    box = []
    for axis in range(nonzero.ndim):
        hits = np.flatnonzero(np.any(nonzero, axis=tuple(a for a in range(nonzero.ndim) if a != axis)))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, nonzero.shape[axis]))
    crop = tuple(slice(a, b) for a, b in box)
    data = np.ascontiguousarray(data[(slice(None),) + crop])
    mask = ndimage.binary_fill_holes(nonzero[crop])
    normalise(data, config["normalization"], mask, config["normalization_min_std"])
    r = config["resampling"]
    target = list(r["target_spacing"]) if config["dims"] == 3 else [spacing[0], *r["target_spacing"]]
    after_crop = list(data.shape[1:])
    shape = [max(1, int(round(s * c / t))) for s, c, t in zip(after_crop, spacing, target)]
    axis = separate_axis(spacing, target, r["anisotropy_threshold"])
    data = np.stack([resample(c, shape, r["image_order"], axis, r["coarse_axis_order"]) for c in data])
    sessions = [
        ort.InferenceSession(str(spec_dir / m["file"]), providers=["CPUExecutionProvider"]) for m in config["models"]
    ]
    probabilities = sliding_window(data, config, sessions, num_classes)
    back = separate_axis(target, spacing, r["anisotropy_threshold"])
    out = np.zeros((num_classes, *before_crop), np.float32)
    out[0] = 1.0 if config["activation"] == "softmax" else 0.0  # background outside the crop
    for k in range(num_classes):
        out[(k,) + crop] = resample(
            probabilities[k], after_crop, r["probabilities_order"], back, r["coarse_axis_order"]
        )
    return out.transpose([0] + [a + 1 for a in config["transpose_backward"]])


def paint(probabilities: np.ndarray, output: dict) -> np.ndarray:
    if output["regions"]:
        labels = np.zeros(probabilities.shape[1:], np.uint8)
        for region, channel in zip(output["regions"], probabilities):
            labels[channel > output["region_threshold"]] = region["paint_value"]
        return labels
    return np.argmax(probabilities, axis=0).astype(np.uint8)  # the lowest index wins a tie


def postprocess(labels: np.ndarray, steps: list[dict], spacing: list[float]) -> np.ndarray:
    for step in steps:
        if step["kind"] == "largest_component":
            mask = np.isin(labels, step["values"])
            components, count = ndimage.label(mask, np.ones((3,) * labels.ndim, bool))
            if count > 1:
                sizes = np.bincount(components.ravel())
                sizes[0] = 0
                labels = np.where(mask & ~np.isin(components, np.flatnonzero(sizes == sizes.max())), 0, labels)
        elif step["kind"] == "relabel_small":
            mask = labels == step["source"]
            if 0 < mask.sum() * math.prod(spacing) < step["max_volume_mm3"]:
                labels = np.where(mask, step["target"], labels)
        else:
            raise SystemExit(f"unknown post-processing step {step['kind']}")
    return labels


def main(spec_path: Path, output: Path, images: list[Path]) -> None:
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != "autoseg-deployment" or spec.get("version") != SUPPORTED_VERSION:
        raise SystemExit(f"{spec_path}: not a deployment spec of version {SUPPORTED_VERSION}")
    data, spacing, reference = read_image(images)
    num_classes = len(spec["output"]["classes"])
    members = [predict_configuration(data, spacing, c, spec_path.parent, num_classes) for c in spec["configurations"]]
    labels = paint(sum(members) / len(members), spec["output"])
    labels = postprocess(labels, spec["postprocessing"]["steps"], spacing)
    values = spec["output"]["label_values"]
    lookup = np.zeros(max(int(k) for k in values) + 1, np.uint8)
    for consecutive, value in values.items():
        lookup[int(consecutive)] = value
    mask = nib.Nifti1Image(lookup[labels].transpose(2, 1, 0), reference.affine, reference.header)
    mask.set_data_dtype(np.uint8)
    nib.save(mask, str(output))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
