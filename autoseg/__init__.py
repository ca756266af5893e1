"""autoseg: self-configuring 3D medical image segmentation.

The data decide the configuration: a dataset fingerprint becomes a JSON plan, and
every stage (preprocessing, training, inference) reads that plan and nothing else.

The Python API for prediction is importable from here: ``autoseg.Predictor`` (trained
folds of one or more configurations, loaded once) and ``autoseg.load_predictor`` (what
``autoseg predict`` uses: follows ``inference.json``). They load lazily, so ``import autoseg`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from autoseg.core.version import __version__

__all__ = ["Predictor", "load_predictor", "__version__"]

_LAZY = {"Predictor": "autoseg.inference.predictor", "load_predictor": "autoseg.inference.choice"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
