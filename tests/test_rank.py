"""`autoseg rank`: unlabelled scans ranked least confident first, out-of-distribution scans listed apart. The
ranking and the command line run on a report made to order (fast); one slow test ranks held-out phantoms with
the `trained` model of conftest.py."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg.commands import rank as rank_module
from autoseg.commands.predict import PredictionReport
from autoseg.commands.rank import rank_cases, ranking_csv, uncertain_volume


def entry(estimates: list[float], *flags: str) -> dict:
    return {
        "structures": {f"s{i}": {"estimated_dice": e} for i, e in enumerate(estimates)},
        "flags": [{"flag": f, "reason": f"{f} reason"} for f in flags],
    }


ENTRIES = {
    "sure": entry([0.95, 0.93]),
    "doubtful": entry([0.55, 0.65], "low_estimated_dice"),
    "middling": entry([0.85, 0.75], "volume"),
    "tie_small": entry([0.75]),
    "tie_large": entry([0.75]),
    "foreign": entry([0.30], "intensity_range"),
    "swapped": entry([0.90], "swapped_channels"),
}
UNCERTAIN = {"tie_small": 1.0, "tie_large": 4.0, "sure": 0.1}


def test_least_confident_first_and_out_of_distribution_apart():
    ranked, apart = rank_cases(ENTRIES, UNCERTAIN)
    assert [r.case for r in ranked] == ["doubtful", "tie_large", "tie_small", "middling", "sure"]
    assert ranked[0].estimated_dice == pytest.approx(0.60)
    assert [r.case for r in apart] == ["foreign", "swapped"]
    rows = list(csv.DictReader(ranking_csv(ranked, apart).splitlines()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5", "", ""]
    assert rows[0] == {
        "rank": "1",
        "case": "doubtful",
        "estimated_dice": "0.6000",
        "uncertain_ml": "",
        "flags": "low_estimated_dice",
        "out_of_distribution": "no",
    }
    assert rows[-2]["out_of_distribution"] == "yes" and rows[-2]["flags"] == "intensity_range"


def test_a_case_without_the_estimate_is_ranked_last():
    ranked, _ = rank_cases({"old": {"flags": []}, "new": entry([0.9])}, {})
    assert [r.case for r in ranked] == ["new", "old"] and ranked[1].estimated_dice is None


def test_the_uncertain_volume_counts_voxels_at_half_the_entropy_or_more(tmp_path):
    values = np.zeros((4, 5, 6), np.float32)
    values[0, :2, :3] = 0.5  # 6 voxels of 2 x 1 x 1.5 mm = 3 mm3
    values[1, 0, 0] = 0.49
    nib.save(nib.Nifti1Image(values, np.diag([1.5, 1.0, 2.0, 1.0])), tmp_path / "c_entropy.nii.gz")
    assert uncertain_volume(tmp_path / "c_entropy.nii.gz") == pytest.approx(6 * 3.0 / 1000)
    assert uncertain_volume(tmp_path / "missing.nii.gz") is None


def test_the_command_predicts_with_the_uncertainty_and_writes_the_ranking(tmp_path, run_cli, monkeypatch):
    asked = []

    def predict_cases(options):
        asked.append(options)
        options.output.mkdir(parents=True)
        page = options.output / "report.html"
        page.write_text("<html></html>")
        return PredictionReport(written=list(ENTRIES), cases=ENTRIES, failed={}, page=page)

    monkeypatch.setattr(rank_module, "predict_cases", predict_cases)
    out = tmp_path / "out"
    result = run_cli("rank", "-i", tmp_path, "-o", out, "-w", tmp_path / "w", "-f", "0", "1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    (options,) = asked
    assert options.uncertainty and options.review_page and options.folds == ("0", "1") and options.device == "cpu"
    rows = list(csv.DictReader((out / "ranking.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["case"] for r in rows] == ["doubtful", "tie_large", "tie_small", "middling", "sure", "foreign", "swapped"]
    assert "Out of distribution" in result.output and f"ranking: {out / 'ranking.csv'}" in result.output
    assert f"review page: {out / 'report.html'}" in result.output


def test_rank_needs_an_output_folder(tmp_path, run_cli):
    result = run_cli("rank", "-i", tmp_path)
    assert result.exit_code == 2 and "--output" in result.output


@pytest.mark.slow
def test_rank_ranks_held_out_phantoms_with_a_trained_model(trained, held_out, tmp_path, run_cli):
    out = tmp_path / "ranked"
    result = run_cli(
        "rank", "-w", trained, "-i", held_out / "imagesTr", "-o", out, "-f", "0", "1", "--device", "cpu", "--fast"
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "ranking.csv").read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 3 and all(r["estimated_dice"] for r in rows)
    ranked = [float(r["estimated_dice"]) for r in rows if r["out_of_distribution"] == "no"]
    assert ranked == sorted(ranked)
    assert all(Path(out / f"{r['case']}_entropy.nii.gz").is_file() for r in rows)
    assert (out / "report.html").is_file() and "estimated Dice" in (out / "report.html").read_text(encoding="utf-8")
