"""The tables ``autoseg select`` prints: models compared, post-processing steps tried, calibration."""

from __future__ import annotations


def candidates_table(document: dict):
    """One row per configuration or ensemble: Dice per scored class and their mean; the chosen one marked."""
    from rich.table import Table

    classes = document["classes"]
    table = Table(title=f"Cross-validation Dice ({document['num_cases']} cases)")
    table.add_column("model")
    for name in classes:
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right")
    for candidate in sorted(document["candidates"], key=lambda c: -c["mean_dice"]):
        chosen = candidate["configurations"] == document["configurations"]
        row = [" + ".join(candidate["configurations"]) + (" *" if chosen else ""),
               *(f"{candidate['dice'][n]:.4f}" for n in classes), f"{candidate['mean_dice']:.4f}"]
        table.add_row(*row, style="bold" if chosen else None)
    return table


def postprocessing_table(document: dict):
    """One row per post-processing step tried: mean Dice before and after, and the verdict."""
    from rich.table import Table

    table = Table(title="Post-processing (on the chosen model's cross-validation)")
    for column, justify in (("step", "left"), ("before", "right"), ("after", "right"), ("adopted", "left")):
        table.add_column(column, justify=justify)
    for decision in document["postprocessing_decisions"]:
        table.add_row(decision["description"], f"{decision['before']['mean_dice']:.4f}",
                      f"{decision['after']['mean_dice']:.4f}", "yes" if decision["adopted"] else "no")
    return table


def quality_line(document: dict) -> str:
    """How well the estimated Dice ranks the real one on cross-validation, per structure."""
    parts = []
    for name, e in document["estimated_dice"].items():
        rho = "-" if e["spearman"] is None else f"{e['spearman']:.2f}"
        parts.append(f"{name} rank correlation {rho}, mean error {e['mean_absolute_error']:.3f}")
    return "estimated vs real Dice on cross-validation: " + "; ".join(parts)


def calibration_table(document: dict):
    """Expected calibration error, Brier score and NLL of the chosen model before and after its temperature."""
    from rich.table import Table

    calibration = document["calibration"]
    table = Table(title=f"Calibration (temperature {calibration['temperature']:.3f}, "
                        f"{calibration['voxels']} voxels near the structures)")
    for column, justify in (("measure", "left"), ("before", "right"), ("after", "right")):
        table.add_column(column, justify=justify)
    for key, name in (("ece", "expected calibration error"), ("brier", "Brier score"), ("nll", "negative log-likelihood")):
        table.add_row(name, f"{calibration[key]['before']:.4f}", f"{calibration[key]['after']:.4f}")
    return table
