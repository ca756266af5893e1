"""`autoseg export` / `import` / `predict -m`: a model travels as one zip, and extraction is safe."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from autoseg.commands.plan import plan_dataset
from autoseg.core.checkpoint import load_checkpoint, save_checkpoint
from autoseg.core.errors import WorkspaceError
from autoseg.core.geometry import Geometry
from autoseg.core.plan import load_plan
from autoseg.data.evaluation.postprocessing import RelabelSmall, step_to_json
from autoseg.deploy.archive import MANIFEST, export_model, import_model, manifest_defaults, read_manifest
from autoseg.inference.predictor import Predictor
from autoseg.model.network import build_network
from autoseg.phantoms import synthetic

SHAPE = (16, 20, 18)


@pytest.fixture(scope="module")
def model_workdir(tmp_path_factory) -> Path:
    """A planned dataset with two folds of random weights (what prediction needs, without training)."""
    root = tmp_path_factory.mktemp("archive")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", 4, shape=SHAPE)
    work = root / "work"
    plan_dataset(
        dataset_dir=dataset, workdir=work, configurations=["3d_fullres"], preprocess=False, show_progress=False
    )
    plan = load_plan(work / "Task01_BrainTumour" / "plans.json")
    config = plan.configuration("3d_fullres")
    for fold in (0, 1):
        torch.manual_seed(fold)
        network = build_network(config, len(plan.channel_names), plan.num_classes, deep_supervision=False)
        folder = work / "Task01_BrainTumour" / "models" / "3d_fullres" / f"fold_{fold}"
        folder.mkdir(parents=True)
        save_checkpoint(
            folder / "checkpoint_final.pt",
            {"weights": network.state_dict(), "epoch": 1, "optimizer": {"big": torch.zeros(1000)}},
        )
        (folder / "validation").mkdir()
        (folder / "validation" / "summary.json").write_text(json.dumps({"version": 1, "mean": {"1": 0.5}}))
    return work


@pytest.fixture(scope="module")
def archive(model_workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zip") / "model.zip"
    export_model(workdir=model_workdir, output=out)
    return out


def test_export_holds_plan_weights_and_summaries_but_no_optimizer_or_paths(archive):
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read(MANIFEST))
        description = json.loads(zf.read("Task01_BrainTumour/dataset.json"))
    fold = "Task01_BrainTumour/models/3d_fullres/fold_{}"
    assert {
        MANIFEST,
        "Task01_BrainTumour/plans.json",
        f"{fold.format(0)}/checkpoint_final.pt",
        f"{fold.format(1)}/checkpoint_final.pt",
        f"{fold.format(1)}/validation/summary.json",
    } <= names
    assert manifest["configurations"] == {"3d_fullres": {"folds": ["0", "1"]}}
    assert description["cases"] == {} and description["source"] == ""
    assert description["channel_names"] == ["FLAIR", "T1w", "T1gd", "T2w"]


def test_export_carries_the_training_statistics_without_case_names_for_predicts_qc(model_workdir, archive, tmp_path):
    from autoseg.commands.predict import quality_reference
    from autoseg.core.plan import load_plan

    with zipfile.ZipFile(archive) as zf:
        shared = json.loads(zf.read("Task01_BrainTumour/fingerprint.json"))
    original = json.loads((model_workdir / "Task01_BrainTumour" / "fingerprint.json").read_text())
    assert sorted(shared["cases"]) == [f"case_{i:04d}" for i in range(len(original["cases"]))]
    assert list(shared["cases"].values()) == [original["cases"][c] for c in sorted(original["cases"])]
    assert shared["source"] == shared["content_hash"] == "" and "BRATS_001" not in json.dumps(shared)
    workspace = import_model(archive=archive, workdir=tmp_path / "other")
    assert quality_reference(workspace, load_plan(workspace.plans)) is not None  # predict -m raises the QC flags


def test_imported_model_predicts_like_the_original(model_workdir, archive, tmp_path):
    import_model(archive=archive, workdir=tmp_path / "other")
    payload = load_checkpoint(tmp_path / "other/Task01_BrainTumour/models/3d_fullres/fold_0/checkpoint_final.pt")
    assert "optimizer" not in payload
    image, _ = synthetic.brain_case(SHAPE, np.random.default_rng(5))
    geometry = Geometry(SHAPE, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    original = Predictor.from_workdir(model_workdir, device="cpu", tta=False).predict_array(image, geometry)
    imported = Predictor.from_workdir(tmp_path / "other", device="cpu", tta=False).predict_array(image, geometry)
    np.testing.assert_array_equal(imported, original)


def test_predict_from_zip_equals_predict_from_workdir(model_workdir, archive, tmp_path, run_cli):
    held_out = synthetic.write_msd_brain(tmp_path / "held", 2, shape=SHAPE, seed=7) / "imagesTr"
    for source, out in ((("-w", model_workdir), tmp_path / "a"), (("-m", archive), tmp_path / "b")):
        result = run_cli("predict", *source, "-i", held_out, "-o", out, "--no-tta", "--device", "cpu", "--no-progress")
        assert result.exit_code == 0, result.output
    for case in sorted(p.name for p in (tmp_path / "a").glob("*.nii.gz")):
        np.testing.assert_array_equal(
            nib.load(tmp_path / "b" / case).get_fdata(), nib.load(tmp_path / "a" / case).get_fdata()
        )
    assert len(list((tmp_path / "b").glob("*.nii.gz"))) == 2


def test_model_folder_inside_a_work_folder_selects_dataset_configuration_and_fold(model_workdir, tmp_path):
    from autoseg.core.errors import WorkspaceError
    from autoseg.deploy.archive import ModelSource, model_source

    dataset = model_workdir / "Task01_BrainTumour"
    models = dataset / "models" / "3d_fullres"
    expected = {
        model_workdir: ModelSource(model_workdir),
        dataset: ModelSource(model_workdir.resolve(), "Task01_BrainTumour"),
        models: ModelSource(model_workdir.resolve(), "Task01_BrainTumour", "3d_fullres"),
        models / "fold_1": ModelSource(model_workdir.resolve(), "Task01_BrainTumour", "3d_fullres", ("1",)),
    }
    for folder, source in expected.items():
        assert model_source(folder, tmp_path) == source
    (dataset / "notes").mkdir(exist_ok=True)
    with pytest.raises(WorkspaceError, match="not under its models/"):
        model_source(dataset / "notes", tmp_path)


def test_predict_with_a_fold_folder_uses_that_fold_only(model_workdir, tmp_path, run_cli):
    held_out = synthetic.write_msd_brain(tmp_path / "held", 1, shape=SHAPE, seed=9) / "imagesTr"
    fold_1 = model_workdir / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_1"
    runs = {"m": ("-m", fold_1), "w1": ("-w", model_workdir, "-f", "1"), "w0": ("-w", model_workdir, "-f", "0")}
    for name, source in runs.items():
        result = run_cli(
            "predict", *source, "-i", held_out, "-o", tmp_path / name, "--no-tta", "--device", "cpu", "--no-progress"
        )
        assert result.exit_code == 0, result.output
    masks = {name: nib.load(tmp_path / name / "BRATS_001.nii.gz").get_fdata() for name in runs}
    np.testing.assert_array_equal(masks["m"], masks["w1"])
    assert not np.array_equal(masks["m"], masks["w0"])  # random weights: the two folds disagree


def test_an_imported_model_cannot_be_trained_or_selected_and_says_why(archive, tmp_path, run_cli):
    assert run_cli("import", archive, "-w", tmp_path).exit_code == 0
    for command in (["train", "--fold", "1", "--epochs", "1", "--device", "cpu"], ["select", "--no-progress"]):
        result = run_cli(*command, "-w", tmp_path)
        assert result.exit_code == 1 and "has no splits.json" in result.output, result.output
        assert "autoseg plan" in result.output and "Traceback" not in result.output
    result = run_cli("show", "BRATS_001", "-w", tmp_path)
    assert result.exit_code == 1 and "lists no cases" in result.output and "give the image file" in result.output


def test_import_refuses_to_replace_a_dataset_unless_asked(archive, tmp_path, run_cli):
    assert run_cli("import", archive, "-w", tmp_path).exit_code == 0
    assert run_cli("import", archive, "-w", tmp_path).exit_code == 0  # the same model again: already there
    plans = tmp_path / "Task01_BrainTumour" / "plans.json"
    plans.write_text(plans.read_text().replace('"version"', '"version" ', 1))  # another model now
    again = run_cli("import", archive, "-w", tmp_path)
    assert again.exit_code == 1 and "--overwrite" in again.output
    stale = tmp_path / "Task01_BrainTumour" / "models" / "2d" / "fold_4"
    stale.mkdir(parents=True)
    (tmp_path / "Task01_BrainTumour" / "inference.json").write_text("{}")
    assert run_cli("import", archive, "-w", tmp_path, "--overwrite").exit_code == 0
    assert not stale.exists() and not (tmp_path / "Task01_BrainTumour" / "inference.json").exists()
    assert (tmp_path / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_1" / "checkpoint_final.pt").is_file()
    assert not list(tmp_path.glob(".import-*"))


def test_export_names_the_missing_fold(model_workdir, tmp_path, run_cli):
    result = run_cli("export", "-w", model_workdir, "-o", tmp_path / "m.zip", "--folds", "0,3")
    assert result.exit_code == 1
    assert "fold(s) 3" in result.output and "trained: 0, 1" in result.output
    assert not (tmp_path / "m.zip").exists()


def test_export_refuses_configurations_it_could_not_rebuild(model_workdir, tmp_path, run_cli):
    work = tmp_path / "work"
    shutil.copytree(model_workdir, work)
    (work / "Task01_BrainTumour" / "models" / "old_config" / "fold_0").mkdir(parents=True)  # planned no more
    shutil.copy(
        work / "Task01_BrainTumour" / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt",
        work / "Task01_BrainTumour" / "models" / "old_config" / "fold_0",
    )
    result = run_cli("export", "-w", work, "-o", tmp_path / "m.zip", "-c", "old_config")
    assert result.exit_code == 1 and "old_config are not in" in result.output
    result = run_cli("export", "-w", work, "-o", tmp_path / "m.zip", "-c", "2d")
    assert result.exit_code == 1 and "not in" in result.output  # this plan has no 2d configuration
    assert run_cli("export", "-w", work, "-o", tmp_path / "m.zip").exit_code == 0  # by default: the planned ones
    assert read_manifest(tmp_path / "m.zip")["configurations"].keys() == {"3d_fullres"}


def _evil_archive(path: Path, archive: Path, member: str, symlink: bool = False) -> Path:
    evil = path / f"evil{abs(hash(member))}.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(evil, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        target.writestr(info, "/etc/passwd" if symlink else "pwned")
    return evil


@pytest.mark.parametrize(
    "member, symlink, message",
    [
        ("/tmp/abs.txt", False, "absolute"),
        ("Task01_BrainTumour/../../escape.txt", False, "'..'"),
        ("Task01_BrainTumour/link", True, "symbolic link"),
        ("elsewhere/file.txt", False, "outside"),
    ],
)
def test_unsafe_archives_are_refused_before_anything_is_written(archive, tmp_path, member, symlink, message):
    evil = _evil_archive(tmp_path, archive, member, symlink)
    target = tmp_path / "work"
    with pytest.raises(WorkspaceError, match=message):
        import_model(archive=evil, workdir=target)
    assert not (target / "Task01_BrainTumour").exists()
    assert not (tmp_path / "escape.txt").exists()


def _archive_with(path: Path, archive: Path, member: str, content: str, replace: bool = False) -> Path:
    """``archive`` with ``member`` added after the others (a second member of that name), or replaced."""
    changed = path / "changed.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(changed, "w") as target:
        for info in source.infolist():
            if not (replace and info.filename == member):
                target.writestr(info, source.read(info))
        target.writestr(member, content)
    return changed


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns, and writes the second member all the same
@pytest.mark.parametrize(
    "member, content, replace, message",
    [
        ("Task01_BrainTumour/plans.json", "{broken", False, "'Task01_BrainTumour/plans.json' appears 2 times"),
        ("Task01_BrainTumour/./plans.json", "{}", False, "appears 2 times"),
        ("Task01_BrainTumour/plans.json", "{broken", True, "is not valid JSON"),
        ("Task01_BrainTumour/plans.json", '{"version": 99}', True, "plan version 99 is not supported"),
        ("Task01_BrainTumour/dataset.json", '{"version": 1}', True, "dataset.json"),
        ("Task01_BrainTumour/fingerprint.json", '{"version": 1}', True, "lacks key(s)"),
        ("Task01_BrainTumour/models/3d_fullres/fold_0/validation/summary.json", "[1,", True, "is not valid JSON"),
    ],
)
def test_a_duplicate_or_broken_json_member_is_refused_before_anything_is_written(
    archive, tmp_path, run_cli, member, content, replace, message
):
    bad = _archive_with(tmp_path, archive, member, content, replace)
    work = tmp_path / "work"
    result = run_cli("import", bad, "-w", work)
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("Error:") == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert not work.exists()  # nothing written, not even the work folder


def test_not_a_model_archive_is_a_clear_error(tmp_path):
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(WorkspaceError, match="not an autoseg model"):
        read_manifest(plain)


def test_export_follows_inference_json_and_predict_m_applies_its_postprocessing(model_workdir, tmp_path, run_cli):
    work = tmp_path / "work"
    shutil.copytree(model_workdir, work)
    held_out = synthetic.write_msd_brain(tmp_path / "held", 1, shape=SHAPE, seed=3) / "imagesTr"
    explicit = export_model(workdir=work, output=tmp_path / "e.zip", folds=["1"])
    assert not explicit["follows_inference_json"] and manifest_defaults(explicit) == ("3d_fullres", "final")
    result = run_cli(
        "predict",
        "-m",
        tmp_path / "e.zip",
        "-i",
        held_out,
        "-o",
        tmp_path / "raw",
        "--no-tta",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    raw = nib.load(next((tmp_path / "raw").glob("*.nii.gz"))).get_fdata()
    values, counts = np.unique(raw[raw > 0], return_counts=True)
    source = int(values[counts.argmax()])
    target = 1 if source != 1 else 2
    step = RelabelSmall(source=source, target=target, max_volume_mm3=1e12)  # always fires: a visible effect
    (work / "Task01_BrainTumour" / "inference.json").write_text(
        json.dumps(
            {
                "version": 1,
                "configurations": ["3d_fullres"],
                "folds": {"3d_fullres": [1]},
                "checkpoint": "final",
                "postprocessing": [step_to_json(step)],
            }
        )
    )

    manifest = export_model(workdir=work, output=tmp_path / "m.zip")
    assert manifest["configurations"] == {"3d_fullres": {"folds": ["1"]}} and manifest["follows_inference_json"]
    assert manifest_defaults(manifest) == (None, None)
    with zipfile.ZipFile(tmp_path / "m.zip") as zf:
        assert "Task01_BrainTumour/inference.json" in zf.namelist()
    result = run_cli(
        "predict",
        "-m",
        tmp_path / "m.zip",
        "-i",
        held_out,
        "-o",
        tmp_path / "out",
        "--no-tta",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    followed = nib.load(next((tmp_path / "out").glob("*.nii.gz"))).get_fdata()
    np.testing.assert_array_equal(followed, np.where(raw == source, target, raw))


def test_import_of_a_missing_file_is_one_clear_line(tmp_path, run_cli):
    result = run_cli("import", tmp_path / "nope.zip", "-w", tmp_path / "work")
    assert result.exit_code == 1
    assert "cannot read model archive" in result.output and "nope.zip" in result.output
