"""`autoseg train` end to end on CPU: learning, regions, budgets, resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import load_checkpoint
from autoseg.phantoms import synthetic
from autoseg.training.trainer import train_fold
from autoseg.workflows.fold import train_and_validate

pytestmark = pytest.mark.slow


def planned(root: Path, writer, n_cases: int = 8) -> Path:
    dataset = writer(root / "raw", n_cases, shape=(32, 40, 36))
    work = root / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    return work


@pytest.fixture(scope="module")
def brain_work(tmp_path_factory) -> Path:
    return planned(tmp_path_factory.mktemp("brain"), synthetic.write_msd_brain)


def epochs_logged(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return [e for e in lines if "epoch" in e]


def test_training_learns_the_tumour(brain_work, run_cli):
    result = run_cli(
        "train",
        "-w",
        brain_work,
        "--fold",
        "0",
        "--epochs",
        "8",
        "--iterations",
        "20",
        "--val-iterations",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    folder = brain_work / "raw" / "models" / "3d_fullres" / "fold_0"
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    assert summary["mean"]["edema"] > 0.6, summary["mean"]  # chance level is ~0.1 (edema fills ~5 % of the head)
    assert summary["mean"]["non-enhancing tumour"] > 0.3, summary["mean"]
    assert len(summary["cases"]) == 2 and all(
        (folder / "validation" / f"{c}.nii.gz").is_file() for c in summary["cases"]
    )
    log = epochs_logged(folder)
    assert [e["epoch"] for e in log] == list(range(8))
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    for entry in log:
        assert entry["lr"] == pytest.approx(0.01 * (1 - entry["epoch"] / 8) ** 0.9)
    assert (folder / "progress.png").stat().st_size > 1000
    state = load_checkpoint(folder / "checkpoint_final.pt")
    assert state["epoch"] == 7 and state["settings"]["iterations"] == 20
    assert state["configuration"]["patch_size"]

    again = run_cli(
        "train", "-w", brain_work, "--fold", "0", "--validate-only", "--no-tta", "--device", "cpu", "--no-progress"
    )
    assert again.exit_code == 0, again.output
    revalidated = json.loads((folder / "validation" / "summary.json").read_text())
    assert revalidated["tta"] is False and revalidated["cases"].keys() == summary["cases"].keys()
    assert len(epochs_logged(folder)) == 8  # validation alone trains nothing


def test_region_training_on_brats_layout(tmp_path):
    work = planned(tmp_path, synthetic.write_brats)
    result = train_and_validate(
        workdir=work, fold="0", epochs=6, iterations=20, val_iterations=4, workers=0, device="cpu", show_progress=False
    )
    assert result.validation["mean"]["whole tumor"] > 0.6, result.validation["mean"]
    assert result.validation["mean"]["tumor core"] > 0.3, result.validation["mean"]
    assert set(result.validation["mean"]) >= {"whole tumor", "tumor core", "enhancing tumor"}
    prediction = next((result.training.folder / "validation").glob("*.nii.gz"))
    import nibabel as nib

    values = set(nib.load(prediction).get_fdata().astype(int).ravel().tolist())
    assert values <= {0, 1, 2, 4}  # written back in the BraTS convention


def _train_command(work: Path, fold: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "autoseg.cli",
        "train",
        "-w",
        str(work),
        "--fold",
        fold,
        "--workers",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--no-validate",
        *extra,
    ]


def test_resume_after_sigkill_loses_at_most_one_epoch(brain_work, tmp_path, process_watch):
    """Killed as a machine kills: the main process only, while its augmentation worker is busy."""
    work = tmp_path / "work"
    shutil.copytree(brain_work, work, ignore=shutil.ignore_patterns("models"))
    folder = work / "raw" / "models" / "3d_fullres" / "fold_1"
    process = subprocess.Popen(
        _train_command(work, "1", "--epochs", "4", "--iterations", "12", "--val-iterations", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        process_watch.wait_until(
            lambda: (folder / "checkpoint_latest.pt").is_file(), process, timeout=300, what="the first epoch was saved"
        )
        time.sleep(1.0)  # now in the middle of epoch 1
        assert process_watch.record(process.pid), "no augmentation worker to orphan"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not process_watch.wait_all_ended(timeout=10), "workers of the killed run still run"
    done_before = len(epochs_logged(folder))
    assert 1 <= done_before < 4
    saved_epoch = load_checkpoint(folder / "checkpoint_latest.pt")["epoch"]
    assert saved_epoch + 1 in (done_before, done_before - 1)  # a kill between log and checkpoint loses that epoch
    # No budget on the command line: the resumed run keeps the one it was started with.
    train_fold(workdir=work, fold="1", workers=0, device="cpu", show_progress=False)
    log = epochs_logged(folder)
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]
    starts = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if '"start"' in line]
    assert starts[-1]["start_epoch"] == saved_epoch + 1
    final = load_checkpoint(folder / "checkpoint_final.pt")
    assert final["epoch"] == 3 and final["settings"]["iterations"] == 12


def test_sigterm_stops_training_and_its_workers_with_one_line(brain_work, tmp_path, process_watch):
    work = tmp_path / "work"
    shutil.copytree(brain_work, work, ignore=shutil.ignore_patterns("models"))
    process = subprocess.Popen(
        _train_command(work, "4", "--epochs", "50", "--iterations", "12", "--val-iterations", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",
    )
    try:
        process_watch.wait_until(
            lambda: process_watch.record(process.pid), process, timeout=300, what="the augmentation worker started"
        )
        time.sleep(0.5)
        process_watch.record(process.pid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-2000:]
    assert "Stopped (SIGTERM)" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not process_watch.wait_all_ended(timeout=10), "augmentation workers outlived the stopped run"
    from autoseg.training.trainer import _lock_fold

    _lock_fold(work / "raw" / "models" / "3d_fullres" / "fold_4", "3d_fullres", "4").close()  # went with the run


def test_ddp_two_gloo_processes_end_with_identical_weights(brain_work, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(brain_work, work, ignore=shutil.ignore_patterns("models"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "autoseg.cli",
        "train",
        "-w",
        str(work),
        "--fold",
        "2",
        "--epochs",
        "2",
        "--iterations",
        "4",
        "--val-iterations",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-validate",
        "--val-every",
        "1",  # rank 0 validates every epoch while rank 1 waits for it in the bounded gloo barrier
    ]
    # faulthandler: should a rank die of a signal, its Python stack shows in the failure message.
    result = subprocess.run(
        command,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    folder = work / "raw" / "models" / "3d_fullres" / "fold_2"
    end = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if '"end"' in line][-1]
    assert len(end["weight_digests"]) == 2 and end["weight_digests"][0] == end["weight_digests"][1]
    start = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if '"start"' in line][-1]
    assert start["settings"]["world_size"] == 2
    assert len(epochs_logged(folder)) == 2 and all("real_dice" in e for e in epochs_logged(folder))


def test_a_fold_being_trained_cannot_be_trained_twice_at_once(brain_work, run_cli):
    from autoseg.training.trainer import _lock_fold

    folder = brain_work / "raw" / "models" / "3d_fullres" / "fold_3"
    folder.mkdir(parents=True, exist_ok=True)
    held = _lock_fold(folder, "3d_fullres", "3")  # another run of fold 3
    try:
        result = run_cli(
            "train",
            "-w",
            brain_work,
            "--fold",
            "3",
            "--epochs",
            "1",
            "--iterations",
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--no-validate",
        )
        assert result.exit_code == 1 and "3d_fullres fold 3 is being trained by process" in result.output
        assert not (folder / "log.jsonl").exists()
    finally:
        held.close()
    result = run_cli(
        "train",
        "-w",
        brain_work,
        "--fold",
        "3",
        "--epochs",
        "1",
        "--iterations",
        "1",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-validate",
    )
    assert result.exit_code == 0, result.output  # released: the fold trains


def test_fold_all_trains_on_every_case_and_a_bad_fold_is_refused(brain_work, run_cli):
    result = run_cli("train", "-w", brain_work, "--fold", "7", "--epochs", "1", "--device", "cpu")
    assert result.exit_code == 1 and "fold 7 does not exist" in result.output
    result = run_cli(
        "train",
        "-w",
        brain_work,
        "--fold",
        "all",
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    folder = brain_work / "raw" / "models" / "3d_fullres" / "fold_all"
    preprocessed = brain_work / "raw" / "preprocessed" / "3d_fullres"
    every = sorted(p.name.removesuffix(".json") for p in preprocessed.glob("*.json"))
    assert len(every) == 8 and (folder / "checkpoint_final.pt").is_file()
    assert sorted(p.name.removesuffix(".nii.gz") for p in (folder / "validation").glob("*.nii.gz")) == every


def test_same_seed_same_weights(brain_work, tmp_path):
    digests = []
    for run in range(2):
        work = tmp_path / f"work{run}"
        shutil.copytree(brain_work, work, ignore=shutil.ignore_patterns("models"))
        train_fold(
            workdir=work,
            fold="3",
            epochs=1,
            iterations=3,
            val_iterations=1,
            workers=0,
            device="cpu",
            seed=5,
            show_progress=False,
        )
        log = (work / "raw" / "models" / "3d_fullres" / "fold_3" / "log.jsonl").read_text().splitlines()
        digests.append(json.loads(log[-1])["weight_digests"][0])
    assert digests[0] == digests[1]


def test_ignore_label_trains(tmp_path):
    import nibabel as nib

    dataset = synthetic.write_nnunet_brain(tmp_path / "raw", 5, shape=(24, 28, 26))
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"]["ignore"] = 4
    (dataset / "dataset.json").write_text(json.dumps(meta))
    for path in (dataset / "labelsTr").glob("*.nii.gz"):
        image = nib.load(path)
        labels = np.asarray(image.dataobj).copy()
        labels[:, :, :8] = 4  # a third of every case unannotated
        nib.save(nib.Nifti1Image(labels, image.affine, image.header), path)
    work = tmp_path / "work"
    plan_dataset(dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], show_progress=False)
    result = train_and_validate(
        workdir=work, fold="0", epochs=1, iterations=3, val_iterations=1, workers=0, device="cpu", show_progress=False
    )
    assert "ignore" not in result.validation["mean"] and "edema" in result.validation["mean"]
    log = epochs_logged(result.training.folder)
    assert np.isfinite(log[0]["train_loss"])


def test_fine_tuning_from_a_model_with_other_channels_and_classes(brain_work, tmp_path, run_cli):
    """--pretrained: matching weights load, the input layer is adapted by channel name, new heads start fresh,
    and a frozen encoder keeps the source's weights."""
    source = brain_work / "raw" / "models" / "3d_fullres" / "fold_2"
    trained = run_cli(
        "train",
        "-w",
        brain_work,
        "--fold",
        "2",
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-validate",
    )
    assert trained.exit_code == 0, trained.output
    target = planned(tmp_path, synthetic.write_brats)  # BraTS: other channel names, regions instead of labels
    result = run_cli(
        "train",
        "-w",
        target,
        "--fold",
        "0",
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-validate",
        "--pretrained",
        source,
        "--freeze-encoder-epochs",
        "1",
    )
    assert result.exit_code == 0, result.output
    folder = target / "raw" / "models" / "3d_fullres" / "fold_0"
    events = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    loaded = next(e for e in events if e.get("event") == "pretrained")
    assert loaded["adapted"] == ["encoder.0.0.0.weight"] and loaded["reinitialised"]
    assert loaded["loaded"] > 20 and str(source) in loaded["source"]
    assert next(e for e in events if e.get("event") == "start")["settings"]["freeze_encoder_epochs"] == 1
    tuned = load_checkpoint(folder / "checkpoint_final.pt")["weights"]
    original = load_checkpoint(source / "checkpoint_final.pt")["weights"]
    frozen = [k for k in original if k.startswith("encoder.") and k != "encoder.0.0.0.weight"]
    assert all(torch.equal(tuned[k], original[k]) for k in frozen)  # loaded, and not moved while frozen
    assert not torch.equal(tuned["decoder.0.0.0.weight"], original["decoder.0.0.0.weight"])  # trained
