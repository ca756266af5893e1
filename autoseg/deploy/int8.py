"""INT8 post-training quantisation of a fold's ONNX model, kept only when its Dice stays within tolerance.

``autoseg export --int8`` runs, per exported fold:

1. **Calibration**: :data:`CALIBRATION_TILES` patch-sized crops of the fold's *training* cases
   (preprocessed arrays of the work folder; half centred on a stored foreground voxel, as
   training's oversampling does, half anywhere), drawn with a seed fixed per fold.
2. **Quantisation**: ONNX Runtime's static quantisation (``quantize_static``, min/max
   calibration, QDQ format): int8 weights per output channel, uint8 activations per tensor, on
   the convolutions only, but for the first and the last (transposed convolutions, instance
   norms, activations and concatenations stay float: OpenVINO runs a quantised transposed
   convolution in float anyway).
3. **Check**: up to :data:`CHECK_CASES` of the fold's *validation* cases (preprocessed, a seeded
   subset of larger folds) are predicted with the fold's fp32 model and with its INT8 model,
   both in OpenVINO (the runtime ``predict --precision int8`` is meant for), through the same
   sliding window without TTA. Each model's Dice against the truth is measured per label and
   region, per case; the INT8 model is accepted only if, for every class, its Dice differs from
   fp32's by at most :data:`MEAN_TOLERANCE` on average over the cases (the mean of the absolute
   differences: a gain on one case does not pay for a loss on another) and by at most
   :data:`WORST_TOLERANCE` on any case (issue 13's tolerance for a faster setting,
   :func:`within_tolerance`, which benchmarks/bench_predict_accuracy.py applies to every setting).

The reference is the truth, not the fp32 mask: the tolerance is about cross-validation Dice,
and a voxel flipped where fp32 was wrong anyway costs nothing. The record of the check goes
into ``deployment.json`` (docs/deployment.md); an accepted model is packed as
``checkpoint_<name>.int8.onnx`` beside the fp32 one. A fold that cannot be checked (its
preprocessed cases or splits are gone) is refused, with the reason.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.core.errors import WorkspaceError
from autoseg.core.files import read_json
from autoseg.core.plan import Configuration, Plan
from autoseg.core.workspace import DatasetWorkspace
from autoseg.data.evaluation.evaluate import dice_per_class
from autoseg.data.io.splits import fold_cases, read_splits
from autoseg.data.preprocessing.restore import paint_labels
from autoseg.inference.backends import OpenVinoModel, TileModel
from autoseg.inference.fold_ensemble import DEFAULT_STEP
from autoseg.inference.onnx_export import import_extra
from autoseg.inference.sliding_window import WindowSettings, as_tensor, predict_probabilities

log = logging.getLogger(__name__)
#: per label/region: the largest |INT8 Dice - fp32 Dice| allowed on average over the checked cases
MEAN_TOLERANCE = 0.002
#: ... and on any one checked case
WORST_TOLERANCE = 0.005
CALIBRATION_TILES = 8
CHECK_CASES = 10
#: the file beside ``checkpoint_<name>.pt`` that holds the fold's accepted INT8 model
QUANTISATION = {
    "tool": "onnxruntime.quantization.quantize_static",
    "format": "QDQ",
    "calibration": "minmax",
    "weights": "int8_symmetric_per_output_channel",
    "activations": "uint8_per_tensor",
    "operators": ["Conv"],
    "float": "convolutions_reading_the_input_or_writing_the_output",
}


def require_int8_extras() -> None:
    """Quantisation needs onnxruntime (the onnx extra), the check needs openvino: one line if either is missing."""
    import_extra("onnxruntime", "INT8 quantisation (export --int8)")
    import_extra("openvino", "the INT8 check (export --int8)")


def _crop(image: np.ndarray, centre: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """The ``patch``-sized crop of a ``(C, *spatial)`` case around ``centre``, zero-padded beyond its border
    (a 2D patch: the crop of the slice through ``centre``)."""
    if len(patch) < image.ndim - 1:  # 2D network: the slice through the centre's first coordinate
        image, centre = image[:, int(centre[0])], centre[1:]
    out = np.zeros((image.shape[0], *patch), np.float32)
    source, target = [slice(None)], [slice(None)]
    for c, p, size in zip(centre, patch, image.shape[1:]):
        start = int(c) - p // 2
        lo, hi = max(0, start), min(size, start + p)
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    out[tuple(target)] = image[tuple(source)]
    return out


def calibration_tiles(
    folder: Path, case_ids: Sequence[str], patch: Sequence[int], count: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``count`` crops ``(1, C, *patch)`` of the preprocessed ``case_ids``: every second one centred on a
    stored foreground voxel (when the case has one), the others anywhere."""
    tiles = []
    for index in range(count):
        case_id = case_ids[int(rng.integers(len(case_ids)))]
        image = np.load(folder / f"{case_id}.npy", mmap_mode="r")
        locations = [v for v in read_json(folder / f"{case_id}.json").get("foreground_locations", {}).values() if v]
        if index % 2 and locations:
            chosen = locations[int(rng.integers(len(locations)))]
            centre = chosen[int(rng.integers(len(chosen)))]
        else:
            centre = [int(rng.integers(size)) for size in image.shape[1:]]
        tiles.append(_crop(image, centre, patch)[None])
    return tiles


def _edge_convolutions(proto) -> list[str]:
    """The convolutions that read the network's input or write its logits: kept in float, as usual for
    INT8 networks (8-bit logits would tie classes at boundaries; both layers are a small share of the work)."""
    ends = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    return [n.name for n in proto.graph.node if n.op_type in QUANTISATION["operators"] and ends & {*n.input, *n.output}]


def quantise(model: bytes, tiles: Sequence[np.ndarray]) -> bytes:
    """The QDQ INT8 model of ``model`` (fp32 ONNX), calibrated on ``tiles``; its metadata (the weights
    digest) is kept."""
    onnx = import_extra("onnx", "INT8 quantisation (export --int8)")
    import_extra("onnxruntime", "INT8 quantisation (export --int8)")
    from onnxruntime import quantization

    class Tiles(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"tiles": tile} for tile in tiles])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="autoseg-int8-") as scratch:
        target = Path(scratch) / "int8.onnx"
        logging.disable(logging.WARNING)  # quantize_static's root-logger advice ("consider pre-processing")
        proto = onnx.load_model_from_string(model)
        try:
            quantization.quantize_static(
                proto,
                target,
                Tiles(),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=QUANTISATION["operators"],
                nodes_to_exclude=_edge_convolutions(proto),
            )
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


def case_dice(model: TileModel, image: np.ndarray, truth: np.ndarray, plan: Plan, config: Configuration) -> dict:
    """Per label and region Dice of ``model``'s prediction (sliding window, no TTA) of a preprocessed case."""
    settings = WindowSettings(patch=tuple(config.patch_size), step=DEFAULT_STEP, max_batch=1)
    probabilities = (
        predict_probabilities([model], as_tensor(image), plan.num_classes, settings, bool(plan.regions), "cpu")
        .float()
        .numpy()
    )
    labels = paint_labels(probabilities, probabilities.shape[1:], plan.regions)
    return dice_per_class(labels, np.maximum(truth, 0), plan.labels, [(r.name, r.labels) for r in plan.regions])


def within_tolerance(differences: Sequence[float]) -> bool:
    """Issue 13's tolerance on one class's per-case Dice differences to the reference: mean |difference|
    at most :data:`MEAN_TOLERANCE`, every |difference| at most :data:`WORST_TOLERANCE`."""
    magnitudes = np.abs(np.asarray(differences, dtype=float))
    return bool(magnitudes.mean() <= MEAN_TOLERANCE and magnitudes.max() <= WORST_TOLERANCE)


def verdict(fp32: dict[str, dict[str, float]], int8: dict[str, dict[str, float]]) -> dict:
    """The check's figures per class (mean Dice of each model, mean and worst difference) and whether they
    stay within the tolerance. ``fp32``/``int8``: case -> class -> Dice."""
    classes, accepted = {}, True
    for name in next(iter(fp32.values())):
        differences = [int8[case][name] - fp32[case][name] for case in fp32]
        accepted &= within_tolerance(differences)
        classes[name] = {
            "fp32_dice": round(float(np.mean([fp32[c][name] for c in fp32])), 6),
            "int8_dice": round(float(np.mean([int8[c][name] for c in int8])), 6),
            "mean_difference": round(float(np.mean(differences)), 6),
            "mean_abs_difference": round(float(np.mean(np.abs(differences))), 6),
            "worst_difference": round(float(max(differences, key=abs)), 6),
        }
    return {"accepted": accepted, "tolerance": {"mean": MEAN_TOLERANCE, "worst": WORST_TOLERANCE}, "classes": classes}


def _fold_data(
    workspace: DatasetWorkspace, plan: Plan, config: Configuration, fold: str, rng: np.random.Generator
) -> tuple[Path, list[str], list[str]]:
    """(preprocessed folder, training cases, checked validation cases) of a fold, or a WorkspaceError."""
    train, val = fold_cases(read_splits(workspace.splits, workspace.name), fold, workspace.name)
    if not train or not val:
        raise WorkspaceError(f"fold {fold} has no training or no validation case in {workspace.splits}")
    folder = workspace.preprocessed(config.data_identifier)
    missing = [c for c in (*train, *val) if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise WorkspaceError(
            f"{len(missing)} of the fold's preprocessed cases are not in {folder} "
            f"(e.g. {missing[0]}); run `autoseg preprocess` first"
        )
    checked = sorted(rng.choice(val, CHECK_CASES, replace=False).tolist()) if len(val) > CHECK_CASES else list(val)
    return folder, list(train), checked


def quantise_fold(
    workspace: DatasetWorkspace, plan: Plan, configuration: str, fold: str, model: bytes
) -> tuple[bytes | None, dict]:
    """(the fold's INT8 model if its check accepted it, else None; the record for ``deployment.json``)."""
    config = plan.configuration(configuration)
    rng = np.random.default_rng(zlib.crc32(f"int8 {configuration} {fold}".encode()))
    try:
        folder, train, checked = _fold_data(workspace, plan, config, fold, rng)
    except (WorkspaceError, OSError, ValueError) as exc:
        return None, {"accepted": False, "reason": f"not checked: {exc}", "quantisation": QUANTISATION}
    int8 = quantise(model, calibration_tiles(folder, train, config.patch_size, CALIBRATION_TILES, rng))
    runs = {"fp32": OpenVinoModel(model), "int8": OpenVinoModel(int8)}
    dice: dict[str, dict[str, dict[str, float]]] = {"fp32": {}, "int8": {}}
    for case_id in checked:
        image = np.load(folder / f"{case_id}.npy")
        truth = np.load(folder / f"{case_id}_seg.npy")
        for name, run in runs.items():
            dice[name][case_id] = case_dice(run, image, truth, plan, config)
    record = {
        **verdict(dice["fp32"], dice["int8"]),
        "quantisation": QUANTISATION,
        "calibration_tiles": CALIBRATION_TILES,
        "calibration_cases": "fold_training_cases",
        "check": {
            "runtime": "openvino",
            "cases": checked,
            "grid": "preprocessed",
            "tta": False,
            "step": DEFAULT_STEP,
            "reference": "truth",
        },
    }
    return (int8 if record["accepted"] else None), record


def check_line(configuration: str, fold: str, record: dict) -> str:
    """One line for ``export``'s output: the verdict and the largest differences over the classes."""
    where = f"INT8 {configuration} fold {fold}:"
    if "classes" not in record:
        return f"{where} refused ({record.get('reason', 'not checked')})"
    classes = record["classes"].values()
    mean = max(c["mean_abs_difference"] for c in classes)
    worst = max((c["worst_difference"] for c in classes), key=abs)
    tolerance = record["tolerance"]
    return (
        f"{where} {'accepted' if record['accepted'] else 'refused'}: Dice vs fp32 ±{mean:.4f} on average "
        f"(tolerance {tolerance['mean']}), {worst:+.4f} worst case (tolerance {tolerance['worst']}) over "
        f"{len(record['check']['cases'])} validation case(s)"
    )
