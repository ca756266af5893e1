"""Portable models: ``autoseg export`` writes one zip, ``autoseg import`` and ``predict -m`` read it.

The archive is a miniature work folder, so everything that reads a work folder reads an
extracted archive unchanged::

    autoseg-model.json                      manifest: version, dataset, configurations, folds, checkpoint (and the
                                            previous stages a cascade stage predicts from, with their folds)
    <dataset>/plans.json
    <dataset>/dataset.json                  channels, labels, regions; no case list, no paths of the raw data
    <dataset>/inference.json                ``autoseg select``'s choice, when the export follows it
    <dataset>/fingerprint.json              the training data's statistics for predict's QC flags, case names removed
    <dataset>/models/<config>/fold_<k>/checkpoint_<name>.pt   weights only (no optimizer state)
    <dataset>/models/<config>/fold_<k>/validation/summary.json  the fold's validation scores, if any
    <dataset>/models/<config>/fold_<k>/checkpoint_<name>.onnx  the fold's network as ONNX (with the onnx extra)
    <dataset>/models/<config>/fold_<k>/checkpoint_<name>.int8.onnx  its INT8 model (export --int8, if accepted)
    <dataset>/deployment.json               what a foreign runtime needs (docs/deployment.md), with the ONNX models

Extraction trusts nothing: absolute names, ``..`` components, links, members outside the
layout above, two members of one name, and JSON members that do not parse (or, for the
plan, dataset, fingerprint and inference.json, do not load) are refused before anything is written, and
files land in the work folder only after the whole archive was extracted to a temporary
folder beside it.
"""

from __future__ import annotations

import io
import json
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from autoseg.core.errors import WorkspaceError
from autoseg.core.files import atomic_path, dumps, read_json
from autoseg.core.plan import Plan, load_plan, plan_from_json
from autoseg.core.version import __version__
from autoseg.core.workspace import CHECKPOINTS, DatasetWorkspace, find_dataset
from autoseg.data.preprocessing.fingerprint import anonymised_fingerprint, fingerprint_from_json, load_fingerprint

ARCHIVE_VERSION = 1
MANIFEST = "autoseg-model.json"


def _slim_checkpoint(path: Path) -> bytes:
    """The checkpoint without optimizer, scaler and RNG state: a third of the size, all prediction needs."""
    import torch

    from autoseg.core.checkpoint import CHECKPOINT_VERSION, load_checkpoint

    payload = load_checkpoint(path)
    slim = {
        "version": CHECKPOINT_VERSION,
        **{k: payload[k] for k in ("weights", "epoch", "settings", "configuration") if k in payload},
    }
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    return buffer.getvalue()


def _dataset_description(workspace: DatasetWorkspace) -> dict:
    record = read_json(workspace.dataset_json)
    return {**record, "source": "", "cases": {}}


def export_model(
    *,
    workdir: Path,
    output: Path,
    dataset: str | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[str] | None = None,
    checkpoint: str | None = None,
    onnx: bool | None = None,
    int8: bool = False,
) -> dict:
    """Write ``output`` (a zip) holding what prediction needs; returns the manifest.

    ``onnx``: also write one ONNX model per fold and ``deployment.json`` (None: when the onnx
    extra is installed; True without it is a MissingExtraError, before anything is written).
    ``int8``: also quantise each fold and pack its INT8 model where its check accepts it
    (:mod:`autoseg.deploy.int8`; needs the onnx and openvino extras, implies ``onnx``).

    With no configuration, fold or checkpoint given, the export follows ``inference.json``
    (``autoseg select``'s choice, post-processing included) when there is one, else takes every
    trained configuration and fold with final checkpoints.
    """
    from autoseg.inference.choice import choose_models

    asked, onnx = onnx, _onnx_wanted(onnx, int8)
    workspace = find_dataset(workdir, dataset)
    plan = load_plan(workspace.plans)
    trained = [c for c in plan.configurations if workspace.trained_folds(c, checkpoint or "final")]
    choice = choose_models(
        workspace, plan, configurations, folds, checkpoint, default_configurations=trained, keep_applicable=False
    )
    if not choice.configurations:
        raise WorkspaceError(
            f"no trained configuration of plans.json in {workspace.root / 'models'}; run `autoseg train` first"
        )
    members: dict[str, Path | bytes] = {f"{workspace.name}/plans.json": workspace.plans}
    if choice.follows_inference_json:
        members[f"{workspace.name}/inference.json"] = workspace.inference
    checkpoint = choice.checkpoint
    chosen = {c: _folds_to_pack(workspace, c, choice.folds[c], checkpoint) for c in choice.configurations}
    stages = _previous_stages(workspace, plan, chosen, checkpoint)
    members.update(_fold_members(workspace, {**stages, **chosen}, checkpoint))
    onnx = onnx and _onnx_for_stages(plan, chosen, asked is True or int8)
    if onnx:
        members.update(_deployment(workspace, chosen, checkpoint, choice.postprocessing, choice.temperature, int8))
    manifest = {
        "version": ARCHIVE_VERSION,
        "autoseg_version": __version__,
        "dataset": workspace.name,
        "checkpoint": checkpoint,
        "configurations": {c: {"folds": f} for c, f in chosen.items()},
        **({"previous_stages": {c: {"folds": f} for c, f in stages.items()}} if stages else {}),
        "follows_inference_json": choice.follows_inference_json,
        "onnx": onnx,
        "int8": int8,
    }
    members[MANIFEST] = dumps(manifest).encode()
    members.update(_dataset_documents(workspace))
    _write_zip(Path(output), members)
    return manifest


def _previous_stages(
    workspace: DatasetWorkspace, plan: Plan, chosen: dict[str, list[str]], checkpoint: str
) -> dict[str, list[str]]:
    """The previous stages of the chosen cascade stages, each with its chosen folds or else every trained one:
    a cascade stage predicts from their masks, so the archive carries them (listed as configurations only when
    chosen themselves)."""
    stages: dict[str, list[str]] = {}
    for name in chosen:
        previous = plan.configuration(name).previous_stage
        while previous is not None and previous not in stages:
            stages[previous] = chosen.get(previous) or _folds_to_pack(workspace, previous, None, checkpoint)
            previous = plan.configuration(previous).previous_stage
    return stages


def _onnx_for_stages(plan: Plan, chosen: dict[str, list[str]], asked: bool) -> bool:
    """Whether ONNX models and deployment.json can describe the chosen models: not a cascade stage (its network
    reads another model's mask, which deployment.json has no words for). Refused by name when ONNX was asked."""
    cascades = [c for c in chosen if plan.configuration(c).previous_stage is not None]
    if cascades and asked:
        raise WorkspaceError(
            f"{cascades[0]} is a cascade stage (its network also reads {plan.configuration(cascades[0]).previous_stage}"
            "'s mask), which deployment.json cannot describe: export it with --no-onnx (autoseg predict -m runs it), "
            "or export another configuration for ONNX"
        )
    return not cascades


def _onnx_wanted(onnx: bool | None, int8: bool) -> bool:
    """Whether the export writes ONNX models; the extras ``onnx`` and ``int8`` need are checked before anything
    is written."""
    from autoseg.deploy.int8 import require_int8_extras
    from autoseg.inference.onnx_export import onnx_export_available

    if int8 and onnx is False:
        raise WorkspaceError("--int8 quantises the ONNX models: drop --no-onnx")
    onnx = onnx_export_available(required=bool(onnx or int8)) if onnx is not False else False
    if int8:
        require_int8_extras()
    return onnx


def _dataset_documents(workspace: DatasetWorkspace) -> dict[str, bytes]:
    """dataset.json (the description prediction needs) and the anonymised fingerprint.json, when there is one."""
    documents = {f"{workspace.name}/dataset.json": dumps(_dataset_description(workspace)).encode()}
    if workspace.fingerprint.is_file():  # a model imported from an older archive may lack it
        fingerprint = anonymised_fingerprint(load_fingerprint(workspace.fingerprint))
        documents[f"{workspace.name}/fingerprint.json"] = dumps(fingerprint).encode()
    return documents


def _fold_members(
    workspace: DatasetWorkspace, chosen: dict[str, list[str]], checkpoint: str
) -> dict[str, Path | bytes]:
    """Each chosen fold's slimmed checkpoint and, when it was validated, its validation summary."""
    members: dict[str, Path | bytes] = {}
    for configuration, wanted in chosen.items():
        for fold in wanted:
            folder = workspace.model(configuration, fold)
            prefix = f"{workspace.name}/models/{configuration}/fold_{fold}"
            members[f"{prefix}/checkpoint_{checkpoint}.pt"] = _slim_checkpoint(folder / f"checkpoint_{checkpoint}.pt")
            summary = folder / "validation" / "summary.json"
            if summary.is_file():
                members[f"{prefix}/validation/summary.json"] = summary
    return members


def int8_lines(archive: Path, dataset: str) -> list[str]:
    """One line per fold of an ``export --int8`` archive: its INT8 check's verdict and figures."""
    from autoseg.deploy.int8 import check_line
    from autoseg.deploy.spec import SPEC_NAME

    with zipfile.ZipFile(archive) as zf:
        spec = json.loads(zf.read(f"{dataset}/{SPEC_NAME}"))
    return [
        check_line(entry["name"], model["fold"], model["int8"])
        for entry in spec["configurations"]
        for model in entry["models"]
        if "int8" in model
    ]


def _folds_to_pack(
    workspace: DatasetWorkspace, configuration: str, folds: Sequence[str] | None, checkpoint: str
) -> list[str]:
    """The folds asked for (default: every trained one), each with its checkpoint, or a WorkspaceError."""
    available = workspace.trained_folds(configuration, checkpoint)
    if not available:
        raise WorkspaceError(
            f"{configuration} has no fold with checkpoint_{checkpoint}.pt; train it first "
            f"(`autoseg train -c {configuration} --fold 0`)"
        )
    wanted = list(folds or available)
    missing = [f for f in wanted if not workspace.checkpoint(configuration, f, checkpoint).is_file()]
    if missing:
        raise WorkspaceError(
            f"{configuration}: no checkpoint_{checkpoint}.pt for fold(s) "
            f"{', '.join(missing)} (trained: {', '.join(available)})"
        )
    return wanted


def _write_zip(output: Path, members: dict[str, Path | bytes]) -> None:
    """Every member, in name order, into ``output`` at once (weights stored, the rest deflated)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name, content in sorted(members.items()):
            data = content.read_bytes() if isinstance(content, Path) else content
            compression = zipfile.ZIP_STORED if name.endswith(".pt") else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=compression)


def _deployment(
    workspace: DatasetWorkspace,
    chosen: dict[str, list[str]],
    checkpoint: str,
    postprocessing,
    temperature: float,
    int8: bool,
) -> dict[str, bytes]:
    """ONNX models of the chosen folds (with ``int8`` their accepted INT8 models) and ``deployment.json``,
    as archive members."""
    from functools import partial

    from autoseg.core.checkpoint import load_inference_weights
    from autoseg.deploy.int8 import quantise_fold
    from autoseg.deploy.spec import deployment_members

    plan = load_plan(workspace.plans)
    weights = {
        c: {f: load_inference_weights(workspace.checkpoint(c, f, checkpoint)) for f in folds}
        for c, folds in chosen.items()
    }
    quantiser = partial(quantise_fold, workspace, plan) if int8 else None
    members = deployment_members(plan, weights, checkpoint, postprocessing, temperature, quantiser)
    return {f"{workspace.name}/{name}": data for name, data in members.items()}


def _check_member(info: zipfile.ZipInfo, dataset: str, archive: Path) -> None:
    """Refuse anything that could write outside the target or is not part of a model."""
    name = info.filename
    path = PurePosixPath(name)
    mode = info.external_attr >> 16
    problem = None
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
        problem = "is an absolute or Windows path"
    elif ".." in path.parts:
        problem = "contains '..'"
    elif stat.S_ISLNK(mode):
        problem = "is a symbolic link"
    elif name != MANIFEST and path.parts[0] != dataset and not info.is_dir():
        problem = f"is outside the model's folder {dataset}/"
    if problem:
        raise WorkspaceError(f"{archive}: member {name!r} {problem}; refusing to extract this archive")


def read_manifest(archive: Path) -> dict:
    """The archive's manifest, validated, after checking every member: its name, and its content if JSON."""
    try:
        with zipfile.ZipFile(archive) as zf:
            manifest = json.loads(zf.read(MANIFEST))
            members = zf.infolist()
            documents = [
                (info.filename, zf.read(info))
                for info in members
                if info.filename.endswith(".json") and not info.is_dir()
            ]
    except KeyError:
        raise WorkspaceError(f"{archive} is not an autoseg model: it has no {MANIFEST}") from None
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise WorkspaceError(f"cannot read model archive {archive}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != ARCHIVE_VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise WorkspaceError(
            f"{archive} is a model archive of version {version}; this autoseg reads version {ARCHIVE_VERSION}"
        )
    dataset = manifest.get("dataset")
    if not isinstance(dataset, str) or not dataset or PurePosixPath(dataset).name != dataset or dataset == "..":
        raise WorkspaceError(f"{archive}: invalid dataset name {dataset!r} in {MANIFEST}")
    configurations = manifest.get("configurations")
    if (
        not isinstance(configurations, dict)
        or not configurations
        or not all(isinstance(c, dict) and isinstance(c.get("folds"), list) for c in configurations.values())
        or manifest.get("checkpoint") not in CHECKPOINTS
    ):
        raise WorkspaceError(
            f"{archive}: {MANIFEST} lacks its configurations, their folds or a checkpoint "
            f"({', '.join(CHECKPOINTS)}); export the model again"
        )
    for info in members:
        _check_member(info, dataset, archive)
    _check_unique(members, archive)
    for name, content in documents:
        _check_document(name, content, dataset, archive)
    return manifest


def _check_unique(members: list[zipfile.ZipInfo], archive: Path) -> None:
    """Two members that extract to one path: the later would silently replace the earlier."""
    seen: dict[PurePosixPath, int] = {}
    for info in members:
        path = PurePosixPath(info.filename)  # "a/./b", "a//b" and "a/b/" land where "a/b" does
        seen[path] = seen.get(path, 0) + 1
    repeated = [(str(path), count) for path, count in seen.items() if count > 1]
    if repeated:
        name, count = repeated[0]
        raise WorkspaceError(
            f"{archive}: member {name!r} appears {count} times; refusing an archive whose "
            "members would overwrite each other"
        )


def _check_document(name: str, content: bytes, dataset: str, archive: Path) -> None:
    """Every JSON member parses, and the files prediction reads (plan, dataset, fingerprint, inference.json) load."""
    from autoseg.data.io.dataset_record import dataset_from_record
    from autoseg.inference.instructions import instructions_from_json

    where = f"{archive}: member {name!r}"
    try:
        data = json.loads(content)
    except ValueError as exc:
        raise WorkspaceError(f"{where} is not valid JSON ({exc}); refusing to extract this archive") from None
    readers = {
        f"{dataset}/plans.json": plan_from_json,
        f"{dataset}/dataset.json": dataset_from_record,
        f"{dataset}/inference.json": instructions_from_json,
        f"{dataset}/fingerprint.json": fingerprint_from_json,
    }
    reader = readers.get(str(PurePosixPath(name)))
    if reader is not None:
        reader(data, where)


def extract_model(archive: Path, destination: Path) -> dict:
    """Extract into ``destination`` (a work folder) after validating every member; returns the manifest."""
    manifest = read_manifest(archive)
    destination.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                target = destination / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    return manifest


def import_model(*, archive: Path, workdir: Path, overwrite: bool = False) -> DatasetWorkspace:
    """Install an exported model into a work folder so that ``autoseg predict`` finds it."""
    archive, workdir = Path(archive), Path(workdir).expanduser().resolve()
    manifest = read_manifest(archive)
    target = workdir / manifest["dataset"]
    if (target / "plans.json").is_file() and not overwrite:
        if _installed(archive, workdir):  # the same archive again (e.g. rerun after a kill): nothing to do
            return DatasetWorkspace(target)
        raise WorkspaceError(
            f"{target} already holds dataset {manifest['dataset']}; import into another "
            "--workdir or pass --overwrite to replace that dataset's folder"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".import-") as staging:
        extract_model(archive, Path(staging))
        if target.exists():  # replaced whole: folds or data of the old plan must not mix with the new one
            target.rename(Path(staging) / "replaced")
        (Path(staging) / manifest["dataset"]).rename(target)
    return DatasetWorkspace(target)


def _installed(archive: Path, workdir: Path) -> bool:
    """Every member of ``archive`` (but its manifest) is in ``workdir`` with the same content."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.filename == MANIFEST:
                continue
            target = workdir / info.filename
            if not target.is_file() or target.stat().st_size != info.file_size or target.read_bytes() != zf.read(info):
                return False
    return True


def manifest_defaults(manifest: dict) -> tuple[str | None, str | None]:
    """(configuration, checkpoint) ``predict -m`` uses when the command line names none.

    An archive that carries ``inference.json`` lets prediction follow it (None, None);
    otherwise its only configuration (if it has one) and its checkpoint.
    """
    if manifest.get("follows_inference_json"):
        return None, None
    configurations = list(manifest["configurations"])
    return (configurations[0] if len(configurations) == 1 else None), manifest["checkpoint"]


@dataclass(frozen=True)
class ModelSource:
    """Where ``predict -m`` finds the model, and what it predicts with when the command line names nothing."""

    workdir: Path
    dataset: str | None = None
    configuration: str | None = None
    folds: tuple[str, ...] | None = None
    checkpoint: str | None = None


def model_source(model: Path, scratch: Path) -> ModelSource:
    """Resolve ``predict -m``: an archive (extracted into ``scratch``) or a folder used where it is.

    A folder may be a work folder, one dataset's folder in it (the one holding plans.json), or a
    folder inside that: ``models/<configuration>`` picks that configuration's trained folds and
    ``models/<configuration>/fold_<k>`` that one fold.
    """
    model = Path(model).expanduser()
    if model.is_file():
        manifest = extract_model(model, scratch)
        configuration, checkpoint = manifest_defaults(manifest)
        return ModelSource(scratch, manifest["dataset"], configuration, None, checkpoint)
    if not model.is_dir():
        raise WorkspaceError(f"model {model} does not exist; give an exported .zip or a work folder")
    model = model.resolve()
    for dataset_dir in (model, *list(model.parents)[:3]):
        if (dataset_dir / "plans.json").is_file():
            inside = model.relative_to(dataset_dir).parts
            if inside and inside[0] != "models":
                raise WorkspaceError(
                    f"model {model} is inside dataset folder {dataset_dir} but not under its "
                    "models/; give the dataset folder, models/<configuration> or a fold folder"
                )
            configuration = inside[1] if len(inside) > 1 else None
            folds = (inside[2].removeprefix("fold_"),) if len(inside) > 2 and inside[2].startswith("fold_") else None
            return ModelSource(dataset_dir.parent, dataset_dir.name, configuration, folds)
    return ModelSource(model)
