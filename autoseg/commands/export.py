"""``autoseg export``: pack a trained model into one zip (:func:`autoseg.deploy.archive.export_model`)
and say what went in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from autoseg.deploy.archive import export_model, int8_lines


def export(
    *,
    workdir: Path,
    output: Path,
    dataset: str | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[str] | None = None,
    checkpoint: str | None = None,
    onnx: bool | None = None,
    int8: bool = False,
) -> list[str]:
    """Write the archive; returns the lines ``export`` prints (what it holds, a missing ONNX extra when
    ``onnx`` was left to the extras, each fold's INT8 verdict)."""
    manifest = export_model(
        workdir=workdir,
        output=output,
        dataset=dataset,
        configurations=configurations,
        folds=folds,
        checkpoint=checkpoint,
        onnx=onnx,
        int8=int8,
    )
    parts = ", ".join(f"{c} folds {' '.join(v['folds'])}" for c, v in manifest["configurations"].items())
    extra = " with ONNX models and deployment.json" if manifest["onnx"] else ""
    lines = [f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB){extra}: {manifest['dataset']}, {parts}"]
    if manifest.get("previous_stages"):
        lines.append(
            f"with the previous stage(s) {', '.join(manifest['previous_stages'])} the cascade predicts from; no "
            "ONNX models: deployment.json cannot describe a cascade stage"
        )
    elif onnx is None and not manifest["onnx"]:
        lines.append("no ONNX models written: the onnx extra is not installed (pip install autoseg[onnx])")
    if int8:
        lines += int8_lines(output, manifest["dataset"])
    return lines
