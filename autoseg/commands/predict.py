"""``autoseg predict``: its options (:class:`PredictOptions`, checked once), where the model comes from (a work
folder, an exported zip, a folder inside one), which models predict, and the loop over a folder of cases:
resume, ``report.json``, DICOM-SEG output (:func:`predict_folder`)."""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.core.errors import AutosegError, OptionError, PlanError, WorkspaceError, out_of_disk
from autoseg.core.files import ensure_writable_folder, read_json, remove_temporaries, write_json
from autoseg.core.plan import Plan, foreground_labels
from autoseg.core.progress import progress_bar
from autoseg.core.workspace import CHECKPOINTS, DatasetWorkspace, default_workdir, find_dataset
from autoseg.data.io.datasets import CaseFiles
from autoseg.data.io.dicom_seg import CODES_KEY
from autoseg.data.io.images import ITK_SUFFIXES
from autoseg.data.preprocessing.fingerprint import load_fingerprint
from autoseg.data.qc.flags import THRESHOLDS, TrainingReference, flag_summary, training_reference
from autoseg.data.qc.uncertainty import structures_of
from autoseg.deploy.archive import model_source
from autoseg.inference.choice import load_predictor
from autoseg.inference.inputs import find_cases
from autoseg.inference.predictor import Predictor
from autoseg.visual.review_cases import channel_index

log = logging.getLogger(__name__)

#: ``predict``'s per-case report (quality-control flags, volumes, uncertainty, statistics), in the output folder.
REPORT = "report.json"
#: 2: every run writes it, with flags, input geometry, intensities and volumes (1: --uncertainty only).
REPORT_VERSION = 2
#: What ``predict --output-type`` writes per case: the mask as NIfTI, as DICOM-SEG, or both.
OUTPUT_FILES = {"nifti": (".nii.gz",), "dicom-seg": (".dcm",), "both": (".nii.gz", ".dcm")}
OUTPUT_TYPES = tuple(OUTPUT_FILES)


@dataclass(frozen=True)
class PredictOptions:
    """Everything ``autoseg predict`` was asked, built once from the command line and checked here: the
    contradictions are :class:`OptionError` (a usage error). ``--fast`` is the preset "no TTA and step 0.75"
    (:attr:`tta` and :attr:`step` give the values that apply); an explicit ``--step`` wins over its step."""

    input: Path
    output: Path
    model: Path | None = None
    workdir: Path | None = None
    dataset: str | None = None
    configurations: tuple[str, ...] | None = None
    folds: tuple[str, ...] | None = None
    checkpoint: str | None = None
    device: str = "auto"
    precision: str = "auto"
    step_size: float | None = None  # None: 0.5, or --fast's 0.75
    backend: str = "auto"  # torch, unless on a CPU select accepted OpenVINO for the model and it is installed
    torch_compile: bool = False
    mirror: bool = True
    fast: bool = False
    mirror_axes: tuple[str, ...] | None = None
    adaptive_tta: float | None = None
    save_probabilities: bool = False
    threads: int | None = None
    overwrite: bool = False
    nan_to_num: bool = False
    output_type: str = "nifti"
    uncertainty: bool = False
    statistics: bool = False
    show_progress: bool = True
    #: report.html beside report.json (:mod:`autoseg.visual.review_cases`), its pictures on this channel.
    review_page: bool = True
    review_channel: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.checkpoint not in CHECKPOINTS:
            raise OptionError(f"choose {', '.join(CHECKPOINTS)}", "--checkpoint")
        if self.model is not None and self.workdir is not None:
            raise OptionError("give either --model or --workdir, not both", "--model")
        if self.output_type not in OUTPUT_TYPES:
            raise OptionError(f"choose {', '.join(OUTPUT_TYPES)}", "--output-type")
        if self.review_channel is not None and not self.review_page:
            raise OptionError("names the review page's channel, which --no-review-page turns off", "--review-channel")
        self._check_mirrors()

    def _check_mirrors(self) -> None:
        if (self.mirror_axes or self.adaptive_tta is not None) and not (self.mirror and not self.fast):
            option = "--mirror-axes" if self.mirror_axes else "--adaptive-tta"
            raise OptionError(
                f"{option} chooses mirrors, which {'--fast' if self.fast else '--no-tta'} turns off; give one of them",
                option,
            )
        if self.adaptive_tta is not None and not 0.5 < self.adaptive_tta < 1:
            raise OptionError(f"{self.adaptive_tta} is not a confidence between 0.5 and 1 (e.g. 0.9)", "--adaptive-tta")
        for axis in self.mirror_axes or ():
            if not axis.isdigit():
                raise OptionError(f"{axis!r} is not an axis; give patch axes 0, 1, 2", "--mirror-axes")

    @property
    def tta(self) -> bool:
        return self.mirror and not self.fast

    @property
    def step(self) -> float:
        if self.step_size is not None:  # an explicit option wins over the preset
            return self.step_size
        return 0.75 if self.fast else 0.5

    def predictor_options(self) -> dict[str, Any]:
        """What every configuration's :class:`~autoseg.inference.fold_ensemble.FoldEnsemble` is built with."""
        axes = [int(a) for a in self.mirror_axes] if self.mirror_axes is not None else None
        return {
            "device": self.device,
            "precision": self.precision,
            "backend": self.backend,
            "torch_compile": self.torch_compile,
            "tta": self.tta,
            "step": self.step,
            "mirror_axes": axes,
            "adaptive_tta": self.adaptive_tta,
        }


def predict_cases(options: PredictOptions) -> PredictionReport:
    """Predict every case under ``options.input`` into ``options.output``.

    ``options.model`` (instead of ``workdir``): an exported archive (extracted to a temporary folder for
    the run) or a work, dataset, configuration or fold folder; what it names is the default the
    command line overrides. ``output_type``: see :func:`predict_folder`; DICOM-SEG codes follow the
    dataset.json's ``dicom_seg_codes`` (carried in the work folder or archive). The quality-control flags
    compare every case with the training cases' ``fingerprint.json`` (:func:`quality_reference`).
    """
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    workdir = options.workdir if options.workdir is not None else default_workdir()
    dataset, configurations, folds, checkpoint = (
        options.dataset,
        options.configurations,
        options.folds,
        options.checkpoint,
    )
    with tempfile.TemporaryDirectory(prefix="autoseg-model-") as scratch:
        if options.model is not None:
            source = model_source(options.model, Path(scratch))
            workdir, dataset = source.workdir, dataset or source.dataset
            if not (configurations or folds or checkpoint):
                configurations = [source.configuration] if source.configuration else None
                folds, checkpoint = (list(source.folds) if source.folds else None), source.checkpoint
        predictor = load_predictor(workdir, dataset, configurations, folds, checkpoint, **options.predictor_options())
        channel = channel_index(options.review_channel, predictor.plan.channel_names)  # refused before any case
        workspace = find_dataset(workdir, dataset)
        record = read_json(workspace.dataset_json)
        report = predict_folder(
            predictor,
            options.input,
            options.output,
            overwrite=options.overwrite,
            save_probabilities=options.save_probabilities,
            nan_to_num=options.nan_to_num,
            output_type=options.output_type,
            dicom_seg_codes=record.get(CODES_KEY),
            uncertainty=options.uncertainty,
            statistics=options.statistics,
            reference=quality_reference(workspace, predictor.plan),
            show_progress=options.show_progress,
        )
        if options.review_page:
            report.page = write_review_page(predictor, options.input, options.output, channel, options.model)
        return report


def write_review_page(
    predictor: Predictor, source: Path, output: Path, channel: int = 0, model: Path | None = None
) -> Path | None:
    """``output/report.html`` from report.json and the masks (:mod:`autoseg.visual.review_cases`); None, with a
    warning, when it cannot be written: the masks and report.json are there whatever happens to the page."""
    from autoseg.visual.review_cases import write_prediction_page

    if not (output / REPORT).is_file():  # no case was predicted: nothing to review
        return None
    plan = predictor.plan
    names = {int(plan.output_label_values.get(str(v), v)): n for n, v in foreground_labels(plan.labels).items()}
    described = f"{plan.dataset}, {' + '.join(m.config.name for m in predictor.members)}"
    described += f" ({model})" if model is not None else ""
    try:
        cases = find_cases(source, plan.channel_names)
        page = write_prediction_page(output, cases, channel, plan.channel_names, names, described)
    except (AutosegError, OSError, ValueError) as exc:
        log.warning("the review page was not written: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None
    return page


def quality_reference(workspace: DatasetWorkspace, plan: Plan) -> TrainingReference | None:
    """The training cases' reference for the QC flags, from the work folder's (or archive's) fingerprint.json;
    None, with a warning, when there is none: the flags that compare with training are then not raised."""
    try:
        fingerprint = load_fingerprint(workspace.fingerprint)
    except PlanError as exc:
        log.warning(
            "no training reference for the quality-control flags (%s): only the flags that need none are raised", exc
        )
        return None
    schemes = [n.scheme for n in next(iter(plan.configurations.values())).normalization]  # the same in each
    return training_reference(fingerprint, structures_of(plan), schemes)


@dataclass
class PredictionReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    #: case -> what ``nan_to_num`` replaced in its image (the case is also in ``written``).
    repaired: dict[str, str] = field(default_factory=dict)
    #: case -> its entry of ``report.json`` (this run's and those an earlier run wrote for skipped cases).
    cases: dict[str, dict] = field(default_factory=dict)
    #: the review page (report.html), when it was written.
    page: Path | None = None

    def flag_lines(self) -> list[str]:
        """One line per case written in this run (``case_003: 2 flags (...)``), then the count flagged."""
        entries = {case: self.cases[case] for case in self.written if case in self.cases}
        flagged = sum(bool(entry.get("flags")) for entry in entries.values())
        lines = [flag_summary(case, entry.get("flags", [])) for case, entry in entries.items()]
        return lines + [f"{flagged} of {len(entries)} case(s) flagged"] if entries else lines


def _previous_cases(path: Path) -> dict[str, dict]:
    """The case entries of an earlier run's report.json (kept for the cases a rerun skips)."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return dict(data.get("cases", {})) if isinstance(data, dict) and data.get("version") == REPORT_VERSION else {}


def predict_folder(
    predictor: Predictor,
    source: Path,
    output: Path,
    *,
    overwrite: bool = False,
    save_probabilities: bool = False,
    nan_to_num: bool = False,
    output_type: str = "nifti",
    dicom_seg_codes: dict | None = None,
    uncertainty: bool = False,
    statistics: bool = False,
    reference: TrainingReference | None = None,
    show_progress: bool = True,
) -> PredictionReport:
    """Predict every case under ``source`` into ``output``; a failing case does not stop the rest (a full disk does).

    ``output_type``: ``nifti`` (``<case>.nii.gz``), ``dicom-seg`` (``<case>.dcm``, DICOM series
    input only, :mod:`autoseg.data.io.dicom_seg`; ``dicom_seg_codes``: the dataset.json's code
    overrides) or ``both``. A case is skipped unless ``overwrite`` when every output asked for exists
    (:func:`requested_files`, and the statistics and uncertainty of its report entry when asked): a rerun
    resumes, and a rerun that asks for more predicts the cases that lack it.
    A case with NaN/Inf voxels fails by name, unless ``nan_to_num`` replaces them; the
    replacement is then logged and listed in ``report.repaired``. ``uncertainty`` adds the maps of
    :meth:`Predictor.predict_case`. ``output/report.json`` holds every case's entry (quality-control
    flags against the training ``reference`` (None: flags that need it are not raised), run time,
    uncertainty and ``statistics`` when asked); it is rewritten after every case, and a rerun keeps
    the entries of the cases it skips.
    """
    if output_type not in OUTPUT_TYPES:
        raise WorkspaceError(f"unknown output type {output_type!r}; choose {', '.join(OUTPUT_TYPES)}")
    _check_output_folder(Path(source), Path(output))
    cases = find_cases(source, predictor.plan.channel_names)
    seg = DicomSegWriter(predictor, dicom_seg_codes) if output_type != "nifti" else None
    if seg is not None:
        seg.check_inputs(cases)
    ensure_writable_folder(output)  # before the first case: no network run in vain
    remove_temporaries(output, [REPORT])  # what a run killed while writing the report left
    report = PredictionReport(cases=_previous_cases(output / REPORT))
    header = _report_header(predictor, reference)
    case_options = {
        "save_probabilities": save_probabilities,
        "nan_to_num": nan_to_num,
        "nifti": output_type != "dicom-seg",
        "dicom_seg": seg,
        "uncertainty": uncertainty,
        "statistics": statistics,
        "reference": reference,
    }
    with progress_bar("Predicting", len(cases), show_progress) as advance:
        for case in cases:
            targets = requested_files(case.case_id, output_type, save_probabilities, uncertainty)
            if not overwrite and _done(output, targets, report.cases.get(case.case_id), statistics, uncertainty):
                report.skipped.append(case.case_id)
            else:
                remove_temporaries(output, targets)
                on_tile = functools.partial(_tile_progress, advance, case.case_id)
                _predict_one(predictor, case, output, report, header, on_tile=on_tile, **case_options)
            advance(case.case_id)
    return report


def requested_files(case_id: str, output_type: str, save_probabilities: bool, uncertainty: bool) -> list[str]:
    """Every file a case's prediction writes as asked: its mask(s), ``.npz`` probabilities, uncertainty maps."""
    names = [f"{case_id}{suffix}" for suffix in OUTPUT_FILES[output_type]]
    if save_probabilities:
        names.append(f"{case_id}.npz")
    if uncertainty:
        names += [f"{case_id}_entropy.nii.gz", f"{case_id}_disagreement.nii.gz"]
    return names


def _done(output: Path, files: list[str], entry: dict | None, statistics: bool, uncertainty: bool) -> bool:
    """A case is done when every output asked for exists: its files, and the report entry's statistics and
    per-structure uncertainty when asked (a rerun with more options predicts the case again)."""
    if not all((output / name).exists() for name in files):
        return False
    wanted = [key for key, asked in (("statistics", statistics), ("structures", uncertainty)) if asked]
    return not wanted or (entry is not None and all(key in entry for key in wanted))


class DicomSegWriter:
    """The DICOM-SEG side of ``predict --output-type``: segments and codes from the plan (and the
    dataset.json's overrides), one file per case referencing the series it was predicted on."""

    def __init__(self, predictor: Predictor, codes: dict | None) -> None:
        from autoseg.data.io.dicom_seg import import_highdicom, parse_code_overrides, segments_for

        import_highdicom()  # a missing extra stops the run before the first case, not at every case
        plan = predictor.plan
        self.segments = segments_for(plan.labels, plan.regions, plan.output_label_values)
        self.codes = parse_code_overrides(codes) if codes else None
        self.algorithm = f"{plan.dataset} {' + '.join(m.config.name for m in predictor.members)}"

    def check_inputs(self, cases: Sequence[CaseFiles]) -> None:
        """DICOM-SEG references a DICOM series: every case must come from one (refused before any case runs)."""
        other = [c.case_id for c in cases if not all(Path(p).is_dir() for p in c.images)]
        if other:
            raise WorkspaceError(
                f"DICOM-SEG output needs DICOM series input; case(s) {', '.join(other[:5])} are "
                "image files: use --output-type nifti for them"
            )

    def write(self, mask: np.ndarray, series: Path, path: Path) -> None:
        from autoseg.data.io.dicom_seg import write_dicom_seg

        write_dicom_seg(
            mask, Path(series), self.segments, path, algorithm_name=self.algorithm, code_overrides=self.codes
        )


def _report_header(predictor: Predictor, reference: TrainingReference | None) -> dict:
    """report.json's fields besides the cases: version, QC thresholds, how the networks ran, the reference."""
    described = None
    if reference is not None:
        described = {"cases": reference.cases, "intensities": reference.channels is not None}
    return {
        "version": REPORT_VERSION,
        "thresholds": THRESHOLDS,
        "settings": predictor.settings(),
        "reference": described,
    }


def _predict_one(
    predictor: Predictor, case: CaseFiles, output: Path, report: PredictionReport, header: dict, **options: Any
) -> None:
    """One case into ``output`` and ``report`` (report.json rewritten); a failure is reported by name and the
    other cases still run, except a full disk, which would stop every other case too (the CLI's one line)."""
    try:
        start = time.perf_counter()
        entry = predictor.predict_case(case, output, **options)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        report.written.append(case.case_id)
        if "repaired" in entry:
            report.repaired[case.case_id] = entry["repaired"]
            log.warning("case %s: %s", case.case_id, entry["repaired"])
        report.cases[case.case_id] = entry
        write_json(output / REPORT, header | {"cases": report.cases})
    except Exception as exc:  # reported by name; the other cases still run
        if out_of_disk(exc):  # so would every other case: stop, with the CLI's one line
            raise
        known = isinstance(exc, (AutosegError, OSError, ValueError))
        reason = str(exc).splitlines()[0] if str(exc) else ""
        report.failed[case.case_id] = reason if known else f"{type(exc).__name__}: {reason}"
        log.error("case %s failed: %s", case.case_id, report.failed[case.case_id])


def _tile_progress(advance, case_id: str, done: int, total: int) -> None:
    advance(f"{case_id}: tile {done}/{total}", step=0)


def _check_output_folder(source: Path, output: Path) -> None:
    """The masks go to a folder of their own: not a file name, not the input folder (they would become input)."""
    if output.name.lower().endswith(ITK_SUFFIXES):
        raise WorkspaceError(
            f"-o {output} looks like a file; give the folder the masks go to (each is named after its case)"
        )
    if source.is_dir() and output.exists() and output.resolve() == source.resolve():
        raise WorkspaceError(
            f"-o {output} is the input folder; give another folder, or the masks would be read as new cases next time"
        )
