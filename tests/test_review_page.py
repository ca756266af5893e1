"""The review page (report.html, evaluation.html) opened in a real browser: headless Chromium loads the file from
disk and the tests read the DOM its script leaves (--dump-dom): every case listed, the flagged and least confident
first, the filter and the sort applied from the address's fragment, and no request leaving the file (Chromium's
network log). The pages are built from phantom cases written here, with a report.json made to order; `predict`'s
own page (a trained model) is in the slow test at the end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autoseg.data.io.images import read_label
from autoseg.inference.inputs import find_cases
from autoseg.phantoms import synthetic
from autoseg.visual.review_cases import write_prediction_page

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
)
SHAPE = (32, 40, 36)
CHANNELS = ("FLAIR", "T1w", "T1gd", "T2w")
LABELS = {1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}
#: case index -> (flags, estimated Dice): two flagged, the rest ordered by confidence.
MADE = {
    0: ([], 0.91),
    1: ([{"flag": "volume", "reason": "edema 99 ml, training 1-20 ml"}], 0.80),
    2: ([], 0.62),
    3: ([{"flag": "low_estimated_dice", "reason": "estimated Dice edema 0.41 (under 0.5)"}], 0.41),
    4: ([], 0.95),
    5: ([], 0.70),
}


def browse(page: Path, fragment: str = "", net_log: Path | None = None, timeout: float = 60) -> str:
    """The DOM Chromium holds once the page's script ran, with every host name unresolvable."""
    profile = page.parent / f".chromium-profile-{abs(hash(fragment))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.resolve().as_uri() + fragment,
    ]
    if net_log is not None:
        command.insert(-2, f"--log-net-log={net_log}")
    done = subprocess.run(command, capture_output=True, encoding="utf-8", timeout=timeout, check=True)
    shutil.rmtree(profile, ignore_errors=True)
    return done.stdout


def articles(dom: str) -> list[tuple[str, bool]]:
    """(case id, hidden) of every row, in the order the page shows them."""
    return [
        (re.search(r'data-name="([^"]*)"', tag).group(1), " hidden" in tag)
        for tag in re.findall(r"<article\b[^>]*>", dom)
    ]


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked for: requests whose network isolation key is the file's (file://); the
    browser's own background requests (updates, time) are keyed otherwise."""
    text = net_log.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except ValueError:  # Chromium may end the log without closing it
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    return [
        e["params"].get("url", "")
        for e in log["events"]
        if "file://" in str(e.get("params", {}).get("network_isolation_key", ""))
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A predict output folder made to order: six phantom cases, their masks, report.json and report.html."""
    root = tmp_path_factory.mktemp("review")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", len(MADE), shape=SHAPE, seed=7)
    output = root / "masks"
    output.mkdir()
    cases = find_cases(dataset / "imagesTr", CHANNELS)
    entries = {}
    for index, case in enumerate(cases):
        shutil.copy(dataset / "labelsTr" / f"{case.case_id}.nii.gz", output / f"{case.case_id}.nii.gz")
        flags, estimate = MADE[index]
        entries[case.case_id] = {
            "flags": flags,
            "input": {"shape": list(SHAPE), "spacing": [1.0, 1.0, 1.0], "orientation": "LPS"},
            "volumes": {"edema": {"volume_ml": 3.0 + index, "training_ml": [1.0, 20.0]}},
            "structures": {"edema": {"estimated_dice": estimate}},
            "seconds": 1.0 + index,
        }
    report = {"version": 2, "settings": {"backend": "torch", "step": 0.5}, "cases": entries}
    (output / "report.json").write_text(json.dumps(report))
    write_prediction_page(output, cases, 0, CHANNELS, LABELS, "Task01_BrainTumour, 3d_fullres")
    return output


def case_ids(run: Path) -> list[str]:
    return sorted(json.loads((run / "report.json").read_text(encoding="utf-8"))["cases"])


def expected_order(run: Path) -> list[str]:
    ids = case_ids(run)
    flagged = sorted((i for i in MADE if MADE[i][0]), key=lambda i: MADE[i][1])
    others = sorted((i for i in MADE if not MADE[i][0]), key=lambda i: MADE[i][1])
    return [ids[i] for i in flagged + others]


def test_the_page_is_one_file_that_names_no_address_outside_itself(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    links = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            links.extend(v for k, v in attrs if k in ("src", "href", "action", "poster", "data") and v)

    Links().feed(page)
    assert links and all(link.startswith("data:image/webp;base64,") for link in links)
    text = re.sub(r"data:image/webp;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(https?|ftp|wss?):|=\s*[\"']?//", text, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page  # no style sheet or font fetched
    assert "default-src 'none'" in page  # the browser refuses any request the page might make


def test_the_page_holds_the_run_and_every_cases_numbers(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Task01_BrainTumour, 3d_fullres" in page and "backend torch, step 0.5" in page
    assert re.search(r'<b id="case-count">6</b> cases, <b id="flagged-count">2</b> flagged', page)
    assert "edema 99 ml, training 1-20 ml" in page and "<b>volume</b>" in page
    assert "1–20" in page and "0.410" in page and "run time 4.0 s" in page
    assert '<meta name="autoseg-review-page" content="1">' in page


def test_a_thumbnail_stays_small_so_a_hundred_cases_fit_in_20_mb(run, tmp_path):
    per_case = (run / "report.html").stat().st_size / len(MADE)
    assert per_case < 60_000, per_case  # measured about 11 kB at 32×40×36
    big = synthetic.write_msd_brain(tmp_path / "big", 1, shape=(96, 192, 176), seed=3)
    output = tmp_path / "masks"
    output.mkdir()
    shutil.copy(big / "labelsTr" / "BRATS_001.nii.gz", output / "BRATS_001.nii.gz")
    (output / "report.json").write_text(json.dumps({"version": 2, "cases": {"BRATS_001": {"flags": []}}}))
    page = write_prediction_page(output, find_cases(big / "imagesTr"), 0, CHANNELS, LABELS, "model")
    assert page.stat().st_size < 200_000, page.stat().st_size  # 100 cases: under 20 MB; measured about 13 kB


@needs_chromium
def test_chromium_lists_every_case_flagged_and_least_confident_first(run):
    rows = articles(browse(run / "report.html"))
    assert [case for case, _ in rows] == expected_order(run)
    assert not any(hidden for _, hidden in rows)


@needs_chromium
def test_chromium_shows_only_the_flagged_cases_when_the_address_asks(run):
    rows = articles(browse(run / "report.html", "#flagged"))
    shown = [case for case, hidden in rows if not hidden]
    assert shown == expected_order(run)[:2]
    assert len(rows) == len(MADE)  # the others are hidden, not removed


@needs_chromium
def test_chromium_sorts_by_name_volume_and_confidence(run):
    ids = case_ids(run)
    assert [c for c, _ in articles(browse(run / "report.html", "#sort=name"))] == ids
    volumes = {c: np.count_nonzero(read_label(run / f"{c}.nii.gz")[0]) for c in ids}
    by_volume = [c for c, _ in articles(browse(run / "report.html", "#sort=volume"))]
    assert [volumes[c] for c in by_volume] == sorted(volumes.values(), reverse=True)
    by_score = [c for c, _ in articles(browse(run / "report.html", "#flagged&sort=score"))]
    assert by_score == [ids[i] for i in sorted(MADE, key=lambda i: MADE[i][1])]


@needs_chromium
def test_no_request_leaves_the_page(run, tmp_path):
    control = tmp_path / "control.html"  # proves the log sees a page's request
    control.write_text('<html><body><img src="http://autoseg-test.invalid/x.png"></body></html>', encoding="utf-8")
    browse(control, net_log=tmp_path / "control.json")
    assert any("autoseg-test.invalid" in url for url in page_requests(tmp_path / "control.json"))
    browse(run / "report.html", "#flagged&sort=volume", net_log=tmp_path / "page.json")
    assert page_requests(tmp_path / "page.json") == []


@needs_chromium
def test_evaluate_writes_a_page_worst_dice_first(run, tmp_path, run_cli):
    ids = case_ids(run)
    dataset = run.parent / "Task01_BrainTumour"
    predictions = tmp_path / "predictions"
    shutil.copytree(run, predictions)
    worst = ids[4]
    truth = nib.load(dataset / "labelsTr" / f"{worst}.nii.gz")
    wrong = np.roll(np.asarray(truth.dataobj), 6, axis=0)  # the mask moved 6 voxels: the worst Dice
    nib.save(nib.Nifti1Image(wrong, truth.affine, truth.header), predictions / f"{worst}.nii.gz")
    result = run_cli(
        "evaluate", "-p", predictions, "-g", dataset / "labelsTr", "--images", dataset / "imagesTr", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert f"review page: {predictions / 'evaluation.html'}" in result.output
    rows = articles(browse(predictions / "evaluation.html"))
    assert rows[0][0] == worst and sorted(c for c, _ in rows) == ids
    page = (predictions / "evaluation.html").read_text(encoding="utf-8")
    assert page.count("contours of the truth (top row) and the prediction (bottom row) on channel 0") == 2 * len(ids)
    assert "<b>volume</b>" in page  # predict's flags, from the report.json beside the predictions


def test_review_options_that_contradict_are_refused_before_anything_is_written(run, tmp_path, run_cli):
    dataset = run.parent / "Task01_BrainTumour"
    out = tmp_path / "out"
    for extra, option in (
        (["--review-channel", "1"], "--review-channel"),  # a channel of no --images
        (["--no-review-page", "--images", dataset / "imagesTr"], "--images"),
        (["--images", dataset / "imagesTr", "--review-channel", "9"], "--review-channel"),
    ):
        result = run_cli("evaluate", "-p", run, "-g", dataset / "labelsTr", "-o", out, *extra)
        assert result.exit_code == 2 and option in result.output, result.output
        assert not out.exists()
    result = run_cli("predict", "-i", dataset / "imagesTr", "-o", out, "--no-review-page", "--review-channel", "T1w")
    assert result.exit_code == 2 and "--review-channel" in result.output
    assert not out.exists()


@pytest.mark.slow
@needs_chromium
def test_predict_writes_the_page_of_its_run(trained, held_out, tmp_path, run_cli):
    out = tmp_path / "masks"
    args = ("predict", "-w", trained, "-i", held_out / "imagesTr", "-o", out, "-f", "0", "--device", "cpu")
    result = run_cli(*args, "--review-channel", "nope", "--no-progress")
    assert result.exit_code == 2 and "FLAIR" in result.output and not out.exists()  # refused before any case
    result = run_cli(*args, "--uncertainty", "--review-channel", "T2w", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"review page: {out / 'report.html'}" in result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "contours of the prediction on T2w" in page and "estimated Dice" in page
    assert sorted(c for c, _ in articles(browse(out / "report.html"))) == sorted(find_ids(held_out))
    none = tmp_path / "none"
    assert run_cli(*args[:6], none, *args[7:], "--fast", "--no-review-page", "--no-progress").exit_code == 0
    assert (none / "report.json").is_file() and not (none / "report.html").exists()


def find_ids(dataset: Path) -> list[str]:
    return [c.case_id for c in find_cases(dataset / "imagesTr")]
