"""The tables ``autoseg select`` prints: models compared, post-processing steps tried, calibration."""

from __future__ import annotations

from typing import Any

from autoseg.core.tables import table


def candidates_table(document: dict) -> Any:
    """One row per configuration or ensemble: Dice per scored class and their mean; the chosen one marked."""
    classes = document["classes"]
    ranked = sorted(document["candidates"], key=lambda c: -c["mean_dice"])
    chosen = {i for i, c in enumerate(ranked) if c["configurations"] == document["configurations"]}
    rows = [
        [
            " + ".join(c["configurations"]) + (" *" if i in chosen else ""),
            *(f"{c['dice'][n]:.4f}" for n in classes),
            f"{c['mean_dice']:.4f}",
        ]
        for i, c in enumerate(ranked)
    ]
    return table(
        f"Cross-validation Dice ({document['num_cases']} cases)",
        ["model", *classes, "mean"],
        rows,
        right=range(1, len(classes) + 2),
        bold=chosen,
    )


def postprocessing_table(document: dict) -> Any:
    """One row per post-processing step tried: mean Dice before and after, and the verdict."""
    rows = [
        [
            d["description"],
            f"{d['before']['mean_dice']:.4f}",
            f"{d['after']['mean_dice']:.4f}",
            "yes" if d["adopted"] else "no",
        ]
        for d in document["postprocessing_decisions"]
    ]
    return table(
        "Post-processing (on the chosen model's cross-validation)",
        ["step", "before", "after", "adopted"],
        rows,
        right={1, 2},
    )


def quality_line(document: dict) -> str:
    """How well the estimated Dice ranks the real one on cross-validation, per structure."""
    parts = []
    for name, e in document["estimated_dice"].items():
        rho = "-" if e["spearman"] is None else f"{e['spearman']:.2f}"
        parts.append(f"{name} rank correlation {rho}, mean error {e['mean_absolute_error']:.3f}")
    return "estimated vs real Dice on cross-validation: " + "; ".join(parts)


def calibration_table(document: dict) -> Any:
    """Expected calibration error, Brier score and NLL of the chosen model before and after its temperature."""
    calibration = document["calibration"]
    rows = [
        [name, f"{calibration[key]['before']:.4f}", f"{calibration[key]['after']:.4f}"]
        for key, name in (
            ("ece", "expected calibration error"),
            ("brier", "Brier score"),
            ("nll", "negative log-likelihood"),
        )
    ]
    return table(
        f"Calibration (temperature {calibration['temperature']:.3f}, "
        f"{calibration['voxels']} voxels near the structures)",
        ["measure", "before", "after"],
        rows,
        right={1, 2},
    )
