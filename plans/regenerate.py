"""Re-derive every reference plan in plans/ from its fingerprint.

Run after an intended planner change, review the diff, and commit it:

    python plans/regenerate.py && git diff plans/

``tests/test_reference_plans.py`` fails on any difference until you do.
"""

from __future__ import annotations

from pathlib import Path

from autoseg.core.plan import save_plan
from autoseg.data.preprocessing.fingerprint import load_fingerprint
from autoseg.planning.planner import plan_from_fingerprint

PLANS_DIR = Path(__file__).resolve().parent


def reference_datasets() -> list[Path]:
    return sorted(p.parent for p in PLANS_DIR.glob("*/fingerprint.json"))


def main() -> None:
    for folder in reference_datasets():
        plan = plan_from_fingerprint(load_fingerprint(folder / "fingerprint.json"))
        save_plan(folder / "plans.json", plan)
        summary = {n: (c.patch_size, c.batch_size, c.network.n_stages) for n, c in plan.configurations.items()}
        print(f"{folder.name}: {summary}")


if __name__ == "__main__":
    main()
