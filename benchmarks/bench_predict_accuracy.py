"""Accuracy of the faster prediction settings: Dice and network passes against the reference setting.

Writes the demo's brain-tumour phantom (MSD Task01 layout, training cases plus held-out cases with
their truth), plans it with a small ``--gpu-memory`` so that the patch is smaller than the cases
(each held-out case spans several tiles, so the step and skipping tiles matter), trains fold 0
briefly with the real training function, then predicts every held-out case with every setting,
each through :class:`autoseg.inference.predictor.Predictor` as ``autoseg predict`` does. Printed
per setting: the backend and precision that actually ran, the network passes run and skipped
(from ``report.json``), the wall time of predicting the held-out cases (informative only: the
machine may be shared), the Dice per class against the truth (mean over cases), and the
difference to the reference setting (torch, fp32, 8 mirrors, step 0.5) per class: the mean over
cases and the worst case, and whether the setting is within the tolerance of issue 13 (mean
|difference| <= 0.002 and worst <= 0.005 for every class).

Settings are named ``<backend>-<precision>-<tta>-<step>``:

* backend: ``torch``, ``compiled`` (torch with ``--compile``) or ``openvino``
  (``--backend`` of ``autoseg predict``);
* precision: ``fp32``, ``bf16`` or ``int8`` (int8: openvino only, through the product path:
  ``autoseg export --int8`` of fold 0 into ``model-int8.zip``, done once and reused with
  ``--keep``, then the archive's INT8 model as ``predict -m model-int8.zip --precision int8``
  runs it; when the export's own Dice check refuses the model, the setting reports the check's
  figures from ``deployment.json`` instead of a prediction);
* tta: ``8`` (mirrors along axes 0 1 2), ``4`` (axes 0 1), ``2`` (axis 0), ``none``, or
  ``adaptive-<threshold>`` (8 mirrors, a tile mirrored only where its first pass is unsure);
* step: the sliding window's step as a fraction of the patch, e.g. ``0.5``.

For example ``torch-bf16-8-0.5``, ``openvino-int8-8-0.5``, ``torch-fp32-adaptive-0.9-0.75``. The
reference ``torch-fp32-8-0.5`` always runs first. Without ``--settings``: torch only, {fp32,
bf16} x TTA {8, 4, 2, none, adaptive-<each --adaptive>} x step {0.5, 0.75}.

Differences are taken over the cases whose truth has the class: where the truth has none (every
fourth phantom has no enhancing tumour), Dice is 1 for an empty prediction and 0 for a single
voxel, a jump that says nothing about the setting; those cases are counted apart
(``empty_truth_changed``: cases where the setting and the reference disagree on emptiness).
``truth_voxels`` gives the size of each class in the held-out truth (over the cases that have
it), so one can read what one voxel is worth in Dice.

Prints ONE JSON object to stdout. ``--keep DIR`` keeps the data, the plan, the trained model and
the INT8 archive there and reuses them on the next run (training is skipped when fold 0 has a
final checkpoint).

    python benchmarks/bench_predict_accuracy.py --threads 1 --keep /tmp/bench-accuracy
    python benchmarks/bench_predict_accuracy.py --threads 1 --keep /tmp/bench-accuracy-large \\
        --shape 64 76 64 --spacing 2.5 --held-out 12 --epochs 40 \\
        --settings torch-bf16-8-0.5 openvino-fp32-8-0.5 openvino-bf16-8-0.5 openvino-int8-8-0.5
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.commands.demo import DATASET_NAME
from autoseg.commands.plan import plan_dataset
from autoseg.commands.predict import REPORT, predict_folder
from autoseg.core.files import read_json
from autoseg.core.plan import load_plan
from autoseg.data.evaluation.evaluate import evaluate_folders
from autoseg.deploy.archive import export_model, extract_model, read_manifest
from autoseg.deploy.int8 import MEAN_TOLERANCE, WORST_TOLERANCE, within_tolerance  # as export --int8
from autoseg.deploy.spec import SPEC_NAME
from autoseg.inference.predictor import Predictor
from autoseg.phantoms import synthetic
from autoseg.workflows.fold import train_and_validate

#: TTA settings: name -> mirror axes (``adaptive-<t>`` mirrors along all three where a tile is unsure)
TTA = {"8": (0, 1, 2), "4": (0, 1), "2": (0,), "none": ()}
BACKENDS = ("torch", "compiled", "openvino")  # compiled: torch with --compile
PRECISIONS = ("fp32", "bf16", "int8")
INT8_ARCHIVE = "model-int8.zip"


@dataclass(frozen=True)
class Setting:
    """One way of predicting: ``<backend>-<precision>-<tta>-<step>`` (see the module docstring)."""

    backend: str
    precision: str
    tta: str
    step: float

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}-{self.tta}-{self.step:g}"

    @classmethod
    def parse(cls, name: str) -> Setting:
        """The setting ``name`` spells, or a ValueError saying what is wrong with it."""
        parts = name.split("-")
        if len(parts) < 4:
            raise ValueError(f"setting {name!r}: expected <backend>-<precision>-<tta>-<step>, e.g. torch-bf16-8-0.5")
        backend, precision, tta, step = parts[0], parts[1], "-".join(parts[2:-1]), parts[-1]
        if backend not in BACKENDS:
            raise ValueError(f"setting {name!r}: backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS or (precision == "int8" and backend != "openvino"):
            raise ValueError(
                f"setting {name!r}: precision {precision!r} is not one of {', '.join(PRECISIONS)} "
                "(int8 with openvino only)"
            )
        if tta not in TTA and not _adaptive_threshold(tta):
            raise ValueError(f"setting {name!r}: TTA {tta!r} is not one of {', '.join(TTA)} or adaptive-<threshold>")
        try:
            value = float(step)
        except ValueError:
            raise ValueError(f"setting {name!r}: step {step!r} is not a number") from None
        if not 0 < value <= 1:
            raise ValueError(f"setting {name!r}: step {step} is not in (0, 1]")
        return cls(backend, precision, tta, value)

    def predictor_options(self) -> dict:
        """Keyword arguments of :class:`Predictor` for this setting (the INT8 model comes from the archive)."""
        threshold = _adaptive_threshold(self.tta)
        if threshold is not None:
            mirrors = {"mirror_axes": TTA["8"], "adaptive_tta": threshold}
        else:
            mirrors = {"tta": bool(TTA[self.tta]), "mirror_axes": TTA[self.tta] or None}
        compiled = self.backend == "compiled"
        return {
            "backend": "torch" if compiled else self.backend,
            "precision": self.precision,
            "step": self.step,
            "torch_compile": compiled,
            **mirrors,
        }


REFERENCE = Setting("torch", "fp32", "8", 0.5)


def _adaptive_threshold(tta: str) -> float | None:
    """``adaptive-0.9`` -> 0.9; None for anything else."""
    if not tta.startswith("adaptive-"):
        return None
    try:
        return float(tta.removeprefix("adaptive-"))
    except ValueError:
        return None


def default_settings(thresholds: list[float]) -> list[Setting]:
    """The grid measured without ``--settings``: torch, {fp32, bf16} x every TTA x step {0.5, 0.75}."""
    tta = [*TTA, *(f"adaptive-{t:g}" for t in thresholds)]
    return [Setting("torch", p, t, s) for p, t, s in itertools.product(("fp32", "bf16"), tta, (0.5, 0.75))]


def chosen_settings(names: list[str] | None, thresholds: list[float]) -> list[Setting]:
    """The settings to measure, the reference first and each once."""
    wanted = [Setting.parse(n) for n in names] if names else default_settings(thresholds)
    return [REFERENCE, *dict.fromkeys(s for s in wanted if s != REFERENCE)]


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16, help="training cases (fold 0 trains on 4/5)")
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[40, 48, 40])
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=0.03,
        help="plan's memory budget (GB): small, so the patch is smaller than a case",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        metavar="SETTING",
        help="settings to measure, <backend>-<precision>-<tta>-<step> (module docstring); default: the torch grid",
    )
    parser.add_argument(
        "--adaptive",
        type=float,
        nargs="+",
        default=[0.9],
        help="adaptive TTA thresholds of the default grid (each one setting)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true", help="stop after training (reuse with --keep)")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    args = parser.parse_args(argv)
    try:
        args.chosen = chosen_settings(args.settings, args.adaptive)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def prepare(root: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Data, plan and a trained fold 0 (reused when ``root`` has them); the training record."""
    raw, work = root / DATASET_NAME, root / "work"
    if not (raw / "dataset.json").is_file():
        synthetic.write_msd_brain(
            raw, args.cases, shape=tuple(args.shape), spacing=(args.spacing,) * 3, seed=args.seed, n_test=args.held_out
        )
    record_path = root / "training.json"
    if not record_path.is_file():
        plan_dataset(
            dataset_dir=raw,
            workdir=work,
            configurations=["3d_fullres"],
            gpu_memory_gb=args.gpu_memory,
            show_progress=False,
        )
        started = time.perf_counter()
        train_and_validate(
            workdir=work,
            fold="0",
            epochs=args.epochs,
            iterations=args.iterations,
            val_every=0,
            workers=1,
            seed=args.seed,
            device="cpu",
            resume=False,
            validate=False,
            show_progress=False,
        )
        record = {
            "epochs": args.epochs,
            "iterations": args.iterations,
            "seed": args.seed,
            "gpu_memory_gb": args.gpu_memory,
            "train_s": round(time.perf_counter() - started, 1),
        }
        record_path.write_text(json.dumps(record))
    return raw, work, json.loads(record_path.read_text())


def int8_model(root: Path, work: Path) -> tuple[Path | None, dict]:
    """``autoseg export --int8`` of fold 0 (once; reused from ``root``): (the archive extracted as a work
    folder, as ``predict -m`` does, if its check accepted the INT8 model, else None; the check's record
    from the archive's deployment.json, with the export's wall time)."""
    archive, timing = root / INT8_ARCHIVE, root / "export-int8.json"
    if not archive.is_file():
        started = time.perf_counter()
        export_model(workdir=work, output=archive, folds=["0"], checkpoint="final", int8=True)
        timing.write_text(json.dumps({"export_s": round(time.perf_counter() - started, 1)}))
    dataset = read_manifest(archive)["dataset"]
    with zipfile.ZipFile(archive) as zf:
        spec = json.loads(zf.read(f"{dataset}/{SPEC_NAME}"))
    record = next(m["int8"] for c in spec["configurations"] for m in c["models"] if m["fold"] == "0")
    record = {**record, **(read_json(timing) if timing.is_file() else {})}
    if not record["accepted"]:
        return None, record
    extracted = root / "model-int8"
    if not (extracted / dataset / "plans.json").is_file():
        extract_model(archive, extracted)
    return extracted, record


def predict_setting(workdir: Path, raw: Path, out: Path, setting: Setting) -> dict:
    """Predict the held-out cases with one setting: what ran, the passes from report.json, the wall time
    and the per-case Dice."""
    started = time.perf_counter()
    predictor = Predictor.from_workdir(workdir, folds=["0"], device="cpu", **setting.predictor_options())
    predict_folder(predictor, raw / "imagesTs", out, overwrite=True, show_progress=False)
    wall = time.perf_counter() - started
    cases = read_json(out / REPORT)["cases"]
    summary = evaluate_folders(
        predictions=out, truth=raw / "labelsTs", dataset_json=raw / "dataset.json", show_progress=False
    )
    ran = predictor.settings()
    return {
        "ran": {"backend": ran["backend"], "precision": ran["precision"], "compiled": ran["compiled"]},
        "passes": {k: sum(c["passes"][k] for c in cases.values()) for k in ("run", "skipped")},
        "tiles": {k: sum(c["passes"][k] for c in cases.values()) for k in ("tiles", "mirrored_tiles")},
        "wall_s_shared_machine": round(wall, 1),
        "dice": {
            case: {name: scores["dice"] for name, scores in per_class.items()}
            for case, per_class in summary["cases"].items()
        },
    }


def truth_voxels(raw: Path, classes: dict) -> dict[str, dict[str, int]]:
    """Per case and class: the truth's voxel count of the class (0: the case has none)."""
    import nibabel as nib

    counts = {}
    for path in sorted((raw / "labelsTs").glob("*.nii.gz")):
        label = np.asarray(nib.load(path).dataobj)
        counts[path.name[: -len(".nii.gz")]] = {n: int(np.isin(label, c["values"]).sum()) for n, c in classes.items()}
    return counts


def voxel_summary(counts: dict[str, dict[str, int]]) -> dict:
    """Per class over the held-out cases that have it: how many, min / median / mean voxels."""
    out = {}
    for name in next(iter(counts.values())):
        sizes = [c[name] for c in counts.values() if c[name]]
        out[name] = {
            "cases": len(sizes),
            "min": min(sizes),
            "median": float(np.median(sizes)),
            "mean": round(float(np.mean(sizes)), 1),
        }
    return out


def compare(result: dict, reference: dict, present: dict) -> dict:
    """Per class: mean Dice against the truth, and the difference to the reference (mean, worst)."""
    classes = next(iter(reference["dice"].values())).keys()
    out, within = {}, True
    for name in classes:
        cases = [c for c in reference["dice"] if present[c][name]]
        diff = [result["dice"][c][name] - reference["dice"][c][name] for c in cases]
        empty = [c for c in reference["dice"] if not present[c][name]]
        changed = sum(result["dice"][c][name] != reference["dice"][c][name] for c in empty)
        mean_abs, worst = float(np.mean(np.abs(diff))), float(np.max(np.abs(diff)))
        ok = within_tolerance(diff)
        within &= ok
        out[name] = {
            "dice": round(float(np.mean([result["dice"][c][name] for c in cases])), 4),
            "diff_mean": round(float(np.mean(diff)), 5),
            "diff_mean_abs": round(mean_abs, 5),
            "diff_worst": round(worst, 5),
            "empty_truth_changed": changed,
            "within": ok,
        }
    return {"classes": out, "within_tolerance": within}


def measure(root: Path, raw: Path, work: Path, settings: list[Setting]) -> tuple[dict, dict | None]:
    """Every setting's prediction of the held-out cases (an INT8 setting whose model the export refused:
    the refusal instead); the INT8 export's record, if a setting needed it."""
    results, int8_record = {}, None
    for setting in settings:
        workdir = work
        if setting.precision == "int8":
            workdir, int8_record = int8_model(root, work)
            if workdir is None:
                results[setting.name] = {"refused": "export --int8's check refused the INT8 model (see int8_export)"}
                continue
        print(f"predicting {setting.name}", file=sys.stderr, flush=True)
        results[setting.name] = predict_setting(workdir, raw, root / "predictions" / setting.name, setting)
    return results, int8_record


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    try:
        raw, work, training = prepare(root, args)
        if args.train_only:
            return
        config = load_plan(work / DATASET_NAME / "plans.json").configuration("3d_fullres")
        results, int8_record = measure(root, raw, work, args.chosen)
        reference = results[REFERENCE.name]
        summary = evaluate_folders(
            predictions=root / "predictions" / REFERENCE.name,
            truth=raw / "labelsTs",
            dataset_json=raw / "dataset.json",
            show_progress=False,
        )
        counts = truth_voxels(raw, summary["classes"])
        present = {case: {n: v > 0 for n, v in per_class.items()} for case, per_class in counts.items()}
        print(
            json.dumps(
                {
                    "data": {
                        "training_cases": args.cases,
                        "held_out": args.held_out,
                        "shape": args.shape,
                        "spacing_mm": args.spacing,
                        "patch": config.patch_size,
                        "stages": len(config.network.features_per_stage),
                        "truth_voxels": voxel_summary(counts),
                    },
                    "training": training,
                    "reference": {
                        "setting": REFERENCE.name,
                        "dice_full_volume": {n: round(summary["mean"][n]["dice"], 4) for n in summary["mean"]},
                        "dice_cases_with_class": {
                            n: c["dice"] for n, c in compare(reference, reference, present)["classes"].items()
                        },
                    },
                    "tolerance": {"mean_abs": MEAN_TOLERANCE, "worst": WORST_TOLERANCE},
                    "int8_export": int8_record,
                    "settings": {
                        name: r
                        if "refused" in r
                        else {k: r[k] for k in ("ran", "passes", "tiles", "wall_s_shared_machine")}
                        | compare(r, reference, present)
                        for name, r in results.items()
                    },
                },
                indent=1,
            )
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
