"""The ``autoseg`` command line: thin typer commands over the Python API.

Heavy imports (numpy, torch, SimpleITK) happen inside command bodies so ``--help`` is
instant. User errors (:class:`AutosegError`) print one readable message and exit 1;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from autoseg.core.version import __version__

app = typer.Typer(
    name="autoseg",
    help="Self-configuring 3D medical image segmentation: plan -> train -> predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: every option name whole and descriptions wrapped, in an 80-column terminal too
    # (rich's option table truncates names and squeezes the descriptions into a narrow column there)
    rich_markup_mode=None,
)
_state = {"verbose": False}
log = logging.getLogger("autoseg")

WorkdirOption = Annotated[
    Path | None,
    typer.Option(
        "--workdir",
        "-w",
        help="Work folder holding every dataset's plans, data and models.",
        show_default="./autoseg_work",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-j",
        min=1,
        help="Worker processes for reading and preprocessing.",
        show_default="number of CPU cores",
    ),
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
#: What a fold is called on the command line: its number or ``all``.
FOLD_NAME = re.compile(r"\d+|all")
CheckpointOption = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="Which checkpoint of each fold: final, best or latest.",
        show_default="inference.json's, else final",
    ),
]


class FoldListCommand(TyperCommand):
    """A command whose ``--folds``/``-f`` (and ``--mirror-axes``) also take several values in a row:
    ``--folds 0 1 2``.

    click options take one value each, but nnU-Net users type ``-f 0 1 2 3 4``. Words that
    follow the option's value and look like its values (a fold: a number or ``all``; an axis: a
    number) become repeated options before click parses them. Commands of this class take no
    positional argument, so no other word can be taken for a fold.
    """

    LIST_OPTIONS = {"--folds": FOLD_NAME, "-f": FOLD_NAME, "--mirror-axes": re.compile(r"\d+")}

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        expanded: list[str] = []
        option, words = None, iter(args)
        for word in words:
            if option is not None and self.LIST_OPTIONS[option].fullmatch(word):
                expanded += [option, word]
                continue
            option = None
            expanded.append(word)
            if word in self.LIST_OPTIONS:
                value = next(words, None)
                if value is not None:
                    expanded.append(value)
                    option = word
        return super().parse_args(ctx, expanded)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False)],
        force=True,
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"autoseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and full tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Self-configuring 3D medical image segmentation: plan -> train -> predict."""
    _state["verbose"] = verbose
    _setup_logging(verbose)


def user_errors(command: Callable) -> Callable:
    """Turn AutosegError, and a full or read-only disk, into one clear message and exit code 1
    (traceback only with --verbose).

    Ctrl-C and SIGTERM stop the command the same way (cleanup runs, workers end): exit 130 and 143.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from autoseg.core.errors import AutosegError, OptionError, storage_failure
        from autoseg.core.processes import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except OptionError as exc:  # contradicting options: a usage error, as typer reports its own
            raise typer.BadParameter(str(exc), param_hint=exc.option) from None
        except AutosegError as exc:
            if _state["verbose"]:
                raise
            typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except Terminated:
            typer.secho("Stopped (SIGTERM); finished work is kept and the next run resumes.", err=True)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            typer.secho("Interrupted; finished work is kept and the next run resumes.", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            problem = storage_failure(exc)
            if problem is None or _state["verbose"]:
                raise
            typer.secho(
                f"Error: {problem}; free space or fix the permissions, then run the same command again "
                "(finished work is kept)",
                err=True,
                fg=typer.colors.RED,
            )
            raise typer.Exit(1) from None

    return wrapper


def _print(parts: list) -> None:
    """Lines as typed, tables (anything else) through :func:`autoseg.core.tables.print_tables`."""
    from autoseg.core.tables import print_tables

    for part in parts:
        if isinstance(part, str):
            typer.echo(part)
        else:
            print_tables(part)


def _settings(cls: type, options: dict, **given: Any) -> Any:
    """A command's frozen settings dataclass built once from its options: each field takes the option of the
    same name (``show_progress``: ``--progress``), ``given`` the others."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in options.items() if k in names}
    if "show_progress" in names and "progress" in options:
        values["show_progress"] = options["progress"]
    return cls(**(values | given))


def _workdir(value: Path | None) -> Path:
    from autoseg.core.workspace import default_workdir

    return value if value is not None else default_workdir()


def _split_configs(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [c.strip() for v in values for c in v.split(",") if c.strip()]


def _as_tuple(values: list[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values is not None else None


def _split_folds(values: list[str] | None) -> list[str] | None:
    """``--folds`` values, each a fold number or ``all``; anything else (``-1``, ``x``) is a usage error."""
    folds = _split_configs(values)
    for fold in folds or ():
        if not FOLD_NAME.fullmatch(fold):
            raise typer.BadParameter(
                f"{fold!r} is not a fold; give fold numbers 0, 1, ... or 'all'", param_hint="--folds"
            )
    return folds


PlanDatasetOption = Annotated[
    Path,
    typer.Option(
        "--dataset",
        "-d",
        help="Dataset folder: MSD (dataset.json with 'modality'), nnU-Net v2 "
        "(dataset.json with 'channel_names') or BraTS (one folder per case).",
        show_default=False,
    ),
]
PlanGpuMemoryOption = Annotated[
    float,
    typer.Option("--gpu-memory", min=1.0, help="GPU memory budget in GB that patch and batch size are fitted to."),
]
PlanConfigsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--configs",
        "-c",
        help="Configurations to plan and preprocess (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres: the last "
        "brings the two before it); repeat or comma-separate.",
        show_default="all that apply",
    ),
]
PlanNoPreprocessOption = Annotated[
    bool, typer.Option("--no-preprocess", help="Only validate, fingerprint, plan and write splits.")
]
PlanForceOption = Annotated[
    bool, typer.Option("--force", help="Recompute the fingerprint even if the data are unchanged.")
]
PlanLikeOption = Annotated[
    Path | None,
    typer.Option(
        "--like",
        help="Take network topology and spacing from a trained model (an exported .zip, a work folder, "
        "models/<config>), so that `train --pretrained` with it loads every weight.",
        show_default=False,
    ),
]
PlanPresetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--preset",
        help="Also plan nnU-Net's residual-encoder presets (resenc-m, resenc-l, resenc-xl: nnUNetPlannerResEncM/L/XL, "
        "each for its own GPU target of 8, 24, 40 GB) as configurations <config>_resenc_l etc.; repeat for several.",
        show_default=False,
    ),
]
PlanChannelMapOption = Annotated[
    list[str] | None,
    typer.Option(
        "--channel-map",
        help="With --like: NEW=MODEL gives this dataset's channel NEW the model's MODEL input filters "
        "(e.g. CT=FLAIR); repeat or comma-separate. Unmapped channels match by name, else start from "
        "the mean of the model's filters.",
        show_default="match by name",
    ),
]


@app.command()
@user_errors
def plan(
    dataset: PlanDatasetOption,
    workdir: WorkdirOption = None,
    workers: WorkersOption = None,
    gpu_memory: PlanGpuMemoryOption = 8.0,
    configs: PlanConfigsOption = None,
    no_preprocess: PlanNoPreprocessOption = False,
    force: PlanForceOption = False,
    like: PlanLikeOption = None,
    channel_map: PlanChannelMapOption = None,
    progress: ProgressOption = True,
    preset: PlanPresetOption = None,
) -> None:
    """Check a dataset, fingerprint it, derive plans.json, write 5-fold splits and preprocess."""
    from autoseg.commands.plan import parse_channel_map, plan_dataset, summary
    from autoseg.core.tables import print_tables

    report = plan_dataset(
        dataset_dir=dataset,
        workdir=_workdir(workdir),
        workers=workers or os.cpu_count() or 1,
        gpu_memory_gb=gpu_memory,
        configurations=_split_configs(configs),
        preprocess=not no_preprocess,
        force=force,
        show_progress=progress,
        like=like,
        presets=_split_configs(preset) or (),
        channel_map=parse_channel_map(channel_map),
    )
    print_tables(*summary(report))


DatasetNameOption = Annotated[
    str | None,
    typer.Option("--dataset", "-d", help="Dataset name in the work folder.", show_default="the only planned one"),
]
ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Configuration from plans.json (3d_fullres, 2d, ...).")
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda (or cuda:N) or mps; auto picks CUDA, then MPS, then CPU.")
]
IterationsOption = Annotated[
    int | None, typer.Option("--iterations", min=1, help="Training iterations per epoch.", show_default="250")
]


TrainFoldOption = Annotated[
    str, typer.Option("--fold", "-f", help="Cross-validation fold (0-4) or 'all' for every case.")
]
TrainEpochsOption = Annotated[
    int | None,
    typer.Option(
        "--epochs",
        min=1,
        help="Epochs in the budget; the learning rate decays over exactly this many.",
        show_default="1000",
    ),
]
TrainValIterationsOption = Annotated[
    int | None,
    typer.Option(
        "--val-iterations", min=1, help="Validation batches per epoch for the pseudo-Dice.", show_default="50"
    ),
]
TrainWorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-j",
        min=0,
        help="Augmentation worker processes (0: in the main process).",
        show_default="CPU cores per process - 1, at least 1, at most 8",
    ),
]
TrainSeedOption = Annotated[int, typer.Option("--seed", help="Seed for weights, sampling and augmentation.")]
TrainResumeOption = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Continue from checkpoint_latest.pt when it exists.")
]
TrainCompileModelOption = Annotated[
    bool, typer.Option("--compile", help="torch.compile the network (worth it on CUDA; slow to start elsewhere).")
]
TrainCheckpointEveryOption = Annotated[
    int, typer.Option("--checkpoint-every", min=1, help="Save checkpoint_latest.pt every N epochs.")
]
TrainValidateOption = Annotated[
    bool,
    typer.Option(
        "--final-validation/--no-final-validation",
        "--validate/--no-validate",
        help="After training, predict every validation case in full (with TTA) into validation/ and "
        "summary.json. Validation during training is --val-every's.",
    ),
]
TrainValidateOnlyOption = Annotated[
    bool, typer.Option("--validate-only", help="Skip training; validate the trained fold's final checkpoint.")
]
TrainTtaOption = Annotated[bool, typer.Option("--tta/--no-tta", help="Mirror test-time augmentation in validation.")]
TrainValEveryOption = Annotated[
    int | None,
    typer.Option(
        "--val-every",
        min=0,
        help="Validation during training: every N epochs predict the validation cases in full (no TTA) "
        "and log their real Dice, which chooses checkpoint_best.pt and drives --early-stop. 0: never "
        "(then the pseudo-Dice chooses). Not with --fold all, whose validation cases are training cases.",
        show_default="about a tenth of the training time; none with --fold all",
    ),
]
TrainEarlyStopOption = Annotated[
    int | None,
    typer.Option(
        "--early-stop",
        min=1,
        help="End training when the real Dice has not improved for this many validations, "
        "after a learning-rate cool-down (--early-stop-cooldown).",
        show_default="off",
    ),
]
TrainEarlyStopDeltaOption = Annotated[
    float | None,
    typer.Option(
        "--early-stop-delta",
        min=0.0,
        max=1.0,
        help="With --early-stop: a real Dice counts as better (for the count "
        "and for checkpoint_best.pt) only when it beats the best by more than this.",
        show_default="0.005",
    ),
]
TrainEarlyStopCooldownOption = Annotated[
    int | None,
    typer.Option(
        "--early-stop-cooldown",
        min=0,
        help="With --early-stop: once it triggers, train this many more epochs while "
        "the learning rate decays to 0 (0: end at once).",
        show_default="half the epochs trained, within the budget",
    ),
]
TrainPretrainedOption = Annotated[
    Path | None,
    typer.Option(
        "--pretrained",
        help="Start from another model's weights: an exported .zip, a work folder, models/<config> or "
        "a fold folder. Channels and classes are matched by name; classes the model lacks start fresh.",
        show_default=False,
    ),
]
TrainWarmupEpochsOption = Annotated[
    int | None,
    typer.Option(
        "--warmup-epochs",
        min=0,
        help="Linear learning-rate warm-up over these first epochs.",
        show_default="with --pretrained a tenth of --epochs (at most 50), else 0",
    ),
]
TrainFreezeEncoderEpochsOption = Annotated[
    int | None,
    typer.Option(
        "--freeze-encoder-epochs",
        min=0,
        help="Keep the encoder fixed for these first epochs (fine-tuning).",
        show_default="0",
    ),
]
TrainHeadsFirstEpochsOption = Annotated[
    int | None,
    typer.Option(
        "--heads-first-epochs",
        min=0,
        help="Train only the segmentation heads for these first epochs, then all "
        "weights (fine-tuning: fresh head rows settle before they send gradients into the pretrained network).",
        show_default="with --pretrained 1 when some classes start fresh (0 when that is all of --epochs), else 0",
    ),
]
TrainContinueOption = Annotated[
    bool,
    typer.Option(
        "--continue",
        help="Go on from the fold's checkpoint_final.pt after cases were added (plan again first): "
        "a short schedule at a tenth of the learning rate; reports validation Dice before and after.",
    ),
]


@app.command()
@user_errors
def train(
    fold: TrainFoldOption = "0",
    dataset: DatasetNameOption = None,
    config: ConfigOption = "3d_fullres",
    workdir: WorkdirOption = None,
    epochs: TrainEpochsOption = None,
    iterations: IterationsOption = None,
    val_iterations: TrainValIterationsOption = None,
    device: DeviceOption = "auto",
    workers: TrainWorkersOption = None,
    seed: TrainSeedOption = 0,
    resume: TrainResumeOption = True,
    compile_model: TrainCompileModelOption = False,
    checkpoint_every: TrainCheckpointEveryOption = 1,
    validate: TrainValidateOption = True,
    validate_only: TrainValidateOnlyOption = False,
    tta: TrainTtaOption = True,
    val_every: TrainValEveryOption = None,
    early_stop: TrainEarlyStopOption = None,
    early_stop_delta: TrainEarlyStopDeltaOption = None,
    early_stop_cooldown: TrainEarlyStopCooldownOption = None,
    pretrained: TrainPretrainedOption = None,
    warmup_epochs: TrainWarmupEpochsOption = None,
    freeze_encoder_epochs: TrainFreezeEncoderEpochsOption = None,
    heads_first_epochs: TrainHeadsFirstEpochsOption = None,
    continue_: TrainContinueOption = False,
    progress: ProgressOption = True,
) -> None:
    """Train one fold of one configuration (multi-GPU: launch the same command with torchrun)."""
    from autoseg.commands.train import TrainOptions, result_lines, train
    from autoseg.training.settings import TrainRequest

    options = locals()
    request = _settings(TrainRequest, options)
    _print(result_lines(train(_settings(TrainOptions, options, configuration=config, request=request)), fold))


EvaluatePredictionsOption = Annotated[
    Path,
    typer.Option(
        "--predictions",
        "-p",
        help="Folder of predicted masks, one <case>.nii.gz (or .nrrd, .mha, ...) each; other files are ignored.",
        show_default=False,
    ),
]
EvaluateTruthOption = Annotated[
    Path,
    typer.Option(
        "--truth", "-g", help="Folder of ground-truth masks with the same case ids (e.g. labelsTr).", show_default=False
    ),
]
EvaluateOutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Folder for summary.json and metrics.csv.", show_default="the predictions folder"
    ),
]
EvaluateLabelsOption = Annotated[
    str,
    typer.Option(
        "--labels",
        help="Label values of both folders: consecutive (as they are) or brats (1 NCR, 2 ED, 4 or 3 ET, "
        "scored as 1 ED, 2 NCR, 3 ET).",
    ),
]
EvaluateRegionsOption = Annotated[
    str | None,
    typer.Option(
        "--regions",
        help="Also score regions: brats (WT = 1|2|3, TC = 2|3, ET = 3 on consecutive values).",
        show_default="the regions of --dataset-json, else none",
    ),
]
EvaluateDatasetJsonOption = Annotated[
    Path | None,
    typer.Option(
        "--dataset-json",
        help="nnU-Net v2 or MSD dataset.json: label names, regions and the ignore label.",
        show_default=False,
    ),
]
EvaluateLesionWiseOption = Annotated[
    bool,
    typer.Option(
        "--lesion-wise",
        help="Also score lesion by lesion, as the BraTS challenges rank since 2023: lesion-wise "
        "Dice and HD95 with found, missed and false-positive lesion counts.",
    ),
]
EvaluateLesionDilationOption = Annotated[
    int,
    typer.Option(
        "--lesion-dilation",
        min=0,
        help="With --lesion-wise: dilation iterations that merge nearby truth fragments "
        "into one lesion and let a nearby prediction match it (BraTS-GLI 3, BraTS-MEN/MET 1).",
    ),
]
EvaluateLesionMinVolumeOption = Annotated[
    float,
    typer.Option(
        "--lesion-min-volume",
        min=0,
        help="With --lesion-wise: truth lesions of at most this many mm3 are not scored (BraTS-GLI 50, BraTS-MET 2).",
    ),
]


ReviewPageOption = Annotated[
    bool,
    typer.Option(
        "--review-page/--no-review-page",
        help="Also write a review page: one self-contained HTML file with a picture and the numbers of every "
        "case, flagged and least confident first (report.html; evaluate: evaluation.html).",
    ),
]
ReviewChannelOption = Annotated[
    str | None,
    typer.Option(
        "--review-channel",
        help="The channel the review page's pictures show, by name or number.",
        show_default="the first",
    ),
]

EvaluateImagesOption = Annotated[
    Path | None,
    typer.Option(
        "--images",
        help="The scans the masks were predicted from (a folder of cases, as predict's -i): the review page draws "
        "the contours over them.",
        show_default="none: contours on a blank background",
    ),
]
EvaluateReviewChannelOption = Annotated[
    str | None,
    typer.Option(
        "--review-channel", help="The channel of --images the review page shows (0 is the first).", show_default="0"
    ),
]


@app.command()
@user_errors
def evaluate(
    predictions: EvaluatePredictionsOption,
    truth: EvaluateTruthOption,
    output: EvaluateOutputOption = None,
    labels: EvaluateLabelsOption = "consecutive",
    regions: EvaluateRegionsOption = None,
    dataset_json: EvaluateDatasetJsonOption = None,
    lesion_wise: EvaluateLesionWiseOption = False,
    lesion_dilation: EvaluateLesionDilationOption = 3,
    lesion_min_volume: EvaluateLesionMinVolumeOption = 50.0,
    review_page: ReviewPageOption = True,
    images: EvaluateImagesOption = None,
    review_channel: EvaluateReviewChannelOption = None,
    progress: ProgressOption = True,
) -> None:
    """Score predicted masks against the truth: Dice, IoU, precision, recall, volumes, HD95 and ASD."""
    from autoseg.commands.evaluate import evaluate as evaluate_folders
    from autoseg.core.tables import print_tables
    from autoseg.data.evaluation.evaluate import summary_tables

    summary = evaluate_folders(
        predictions=predictions,
        truth=truth,
        output=output,
        labels=labels,
        regions=regions,
        dataset_json=dataset_json,
        lesion_wise=lesion_wise,
        lesion_dilation=lesion_dilation,
        lesion_min_volume=lesion_min_volume,
        review_page=review_page,
        images=images,
        review_channel=review_channel,
        show_progress=progress,
    )
    print_tables(*summary_tables(summary))
    typer.echo(f"wrote summary.json and metrics.csv to {output if output is not None else predictions}")
    if "review_page" in summary:
        typer.echo(f"review page: {summary['review_page']}")


InputOption = Annotated[
    Path,
    typer.Option(
        "--input",
        "-i",
        help="A folder of cases (CASE_0000.nii.gz channel files, 4D images, BraTS case folders, "
        "DICOM series folders) or a single image file.",
        show_default=False,
    ),
]
OutputMasksOption = Annotated[
    Path, typer.Option("--output", "-o", help="Folder for the masks, one <case>.nii.gz each.", show_default=False)
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="An exported model (.zip from `autoseg export`) or a work folder to predict with, instead of --workdir.",
        show_default=False,
    ),
]
PredictConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        help="Configuration(s) from plans.json; comma-separate several to average them.",
        show_default="inference.json's (autoseg select), else 3d_fullres",
    ),
]
PredictFoldsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--folds",
        "-f",
        help="Folds to ensemble: --folds 0 1 2, --folds 0,1,2 or -f 0 -f 1.",
        show_default="inference.json's, else every trained fold",
    ),
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16/fp16 on CUDA; on CPUs with AVX512-BF16 or AMX bf16 for a model whose bf16 "
        "check in `select` passed, else fp32), fp32, bf16 (~2x faster on those CPUs, emulated and slower elsewhere), "
        "fp16 (CUDA) or int8 (the INT8 models of `export --int8`, --backend openvino; never chosen by auto).",
    ),
]
StepOption = Annotated[
    float | None,
    typer.Option(
        "--step",
        min=0.1,
        max=1.0,
        help="Sliding-window step as a fraction of the patch (smaller: more overlap); wins over --fast's.",
        show_default="0.5; 0.75 with --fast",
    ),
]
BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="Runtime for the network: torch, onnxruntime (pip install autoseg[onnx]), openvino "
        "(pip install autoseg[openvino]) or auto (torch on CUDA; on a CPU openvino where it is installed and "
        "`autoseg select` found it agrees with torch on the model, else torch; INT8 models: openvino, else "
        "onnxruntime).",
    ),
]
PredictCompileOption = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the network (--backend torch; needs a C++ compiler): ~5% faster per case on a "
        "CPU after ~13 s of compiling at load, ~0.35 GB more memory.",
    ),
]
PredictTtaOption = Annotated[
    bool, typer.Option("--tta/--no-tta", help="Mirror test-time augmentation (8 passes in 3D).")
]
FastOption = Annotated[
    bool, typer.Option("--fast", help="No TTA and step 0.75 (unless --step is given): about 10x less work.")
]
MirrorAxesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--mirror-axes",
        help="Patch axes TTA mirrors: --mirror-axes 0 1 (or 0,1); 2^axes passes per window.",
        show_default="every axis (8 passes in 3D)",
    ),
]
AdaptiveTtaOption = Annotated[
    float | None,
    typer.Option(
        "--adaptive-tta",
        help="Mirror only the windows whose first (unmirrored) pass has a voxel less sure than "
        "this (top class probability, 0.5-1, e.g. 0.9); the others keep their one pass. Passes run and skipped "
        "go to report.json.",
        show_default="off: every window mirrored",
    ),
]
SaveProbabilitiesOption = Annotated[
    bool,
    typer.Option(
        "--save-probabilities", help="Also write <case>.npz with float16 class probabilities on the input grid."
    ),
]
ThreadsOption = Annotated[
    int | None, typer.Option("--threads", min=1, help="CPU threads for torch.", show_default="torch's default")
]
OverwriteMasksOption = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Predict cases whose mask already exists (default: skip them, so a rerun resumes)."
    ),
]
NanToNumOption = Annotated[
    bool,
    typer.Option(
        "--nan-to-num",
        help="Replace NaN and -Inf voxels by their channel's minimum and +Inf by its maximum, and "
        "list the cases repaired (default: such a case fails by name).",
    ),
]
OutputTypeOption = Annotated[
    str,
    typer.Option(
        "--output-type",
        help="nifti (<case>.nii.gz), dicom-seg (<case>.dcm, a DICOM Segmentation referencing "
        "the input series; DICOM input only; needs autoseg[dicom]) or both.",
    ),
]
UncertaintyOption = Annotated[
    bool,
    typer.Option(
        "--uncertainty",
        help="Also write <case>_entropy.nii.gz and <case>_disagreement.nii.gz (folds apart) and "
        "per structure entropy, fold disagreement and estimated Dice in report.json.",
    ),
]
StatisticsOption = Annotated[
    bool,
    typer.Option(
        "--statistics",
        help="Also put each structure's volume (ml), voxel count and mean intensity per channel into report.json.",
    ),
]


@app.command(cls=FoldListCommand)
@user_errors
def predict(
    input: InputOption,
    output: OutputMasksOption,
    model: ModelOption = None,
    dataset: DatasetNameOption = None,
    config: PredictConfigOption = None,
    workdir: WorkdirOption = None,
    folds: PredictFoldsOption = None,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    step: StepOption = None,
    backend: BackendOption = "auto",
    compile: PredictCompileOption = False,
    tta: PredictTtaOption = True,
    fast: FastOption = False,
    mirror_axes: MirrorAxesOption = None,
    adaptive_tta: AdaptiveTtaOption = None,
    save_probabilities: SaveProbabilitiesOption = False,
    threads: ThreadsOption = None,
    overwrite: OverwriteMasksOption = False,
    nan_to_num: NanToNumOption = False,
    output_type: OutputTypeOption = "nifti",
    uncertainty: UncertaintyOption = False,
    statistics: StatisticsOption = False,
    review_page: ReviewPageOption = True,
    review_channel: ReviewChannelOption = None,
    progress: ProgressOption = True,
) -> None:
    """Segment new scans with the trained folds: same preprocessing, sliding window, TTA, fold ensemble.

    Without -c/--folds/--checkpoint it follows inference.json (written by `autoseg select`) when present.
    """
    from autoseg.commands.predict import PredictOptions, predict_cases

    options = _settings(
        PredictOptions,
        locals(),
        configurations=_as_tuple(_split_configs([config] if config else None)),
        folds=_as_tuple(_split_folds(folds)),
        mirror_axes=_as_tuple(_split_configs(mirror_axes)),
        step_size=step,
        torch_compile=compile,
        mirror=tta,
    )
    report = predict_cases(options)
    _print_prediction_report(report, output)
    if report.failed:
        raise typer.Exit(1)


def _print_prediction_report(report, output: Path) -> None:
    """Counts, repaired inputs, quality-control flags (reasons in report.json) and failures, one line each."""
    typer.echo(
        f"{len(report.written)} written, {len(report.skipped)} skipped (already there), "
        f"{len(report.failed)} failed -> {output}"
    )
    for case_id, repair in report.repaired.items():
        typer.secho(f"  {case_id}: {repair}", fg=typer.colors.YELLOW)
    for line in report.flag_lines():
        typer.echo(f"  {line}")
    for case_id, reason in report.failed.items():
        typer.secho(f"  {case_id}: {reason}", err=True, fg=typer.colors.RED)
    if report.page is not None:
        typer.echo(f"review page: {report.page}")


RankOutputOption = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="Folder for ranking.csv, the review page and predict's files (masks, uncertainty maps, report.json).",
        show_default=False,
    ),
]


@app.command(cls=FoldListCommand)
@user_errors
def rank(
    input: InputOption,
    output: RankOutputOption,
    model: ModelOption = None,
    dataset: DatasetNameOption = None,
    config: PredictConfigOption = None,
    workdir: WorkdirOption = None,
    folds: PredictFoldsOption = None,
    checkpoint: CheckpointOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    fast: FastOption = False,
    overwrite: OverwriteMasksOption = False,
    review_channel: ReviewChannelOption = None,
    progress: ProgressOption = True,
) -> None:
    """Choose which unlabelled scans to label next: predict each with the uncertainty estimate and rank them,
    least confident first (ranking.csv, review page); scans unlike the training scans are listed apart."""
    from autoseg.commands.predict import PredictOptions
    from autoseg.commands.rank import rank as rank_scans
    from autoseg.commands.rank import summary

    options = _settings(
        PredictOptions,
        locals(),
        configurations=_as_tuple(_split_configs([config] if config else None)),
        folds=_as_tuple(_split_folds(folds)),
        uncertainty=True,
    )
    ranking = rank_scans(options)
    _print(summary(ranking))
    if ranking.prediction.failed:
        raise typer.Exit(1)


SelectConfigsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--configs",
        "-c",
        help="Configurations to compare (every fold validated); repeat or comma-separate.",
        show_default="every trained one, incomplete ones skipped",
    ),
]
SelectEnsemblesOption = Annotated[
    bool, typer.Option("--ensembles/--no-ensembles", help="Also score every ensemble of two or more configurations.")
]
SelectPostprocessingOption = Annotated[
    bool,
    typer.Option(
        "--postprocessing/--no-postprocessing",
        help="Decide post-processing on the chosen model's "
        "cross-validation (largest component; BraTS-like enhancing-tumour relabel).",
    ),
]


@app.command(name="select")
@user_errors
def select_command(
    dataset: DatasetNameOption = None,
    workdir: WorkdirOption = None,
    configs: SelectConfigsOption = None,
    ensembles: SelectEnsemblesOption = True,
    postprocessing: SelectPostprocessingOption = True,
    progress: ProgressOption = True,
) -> None:
    """Choose the best configuration or ensemble and its post-processing on cross-validation; write inference.json."""
    from autoseg.commands.select import select_model, summary

    document = select_model(
        workdir=_workdir(workdir),
        dataset=dataset,
        configurations=_split_configs(configs),
        ensembles=ensembles,
        postprocessing=postprocessing,
        show_progress=progress,
    )
    _print(summary(document))


ExportOutputOption = Annotated[
    Path, typer.Option("--output", "-o", help="The model archive to write (.zip).", show_default=False)
]
ExportConfigsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--configs",
        "--config",
        "-c",
        help="Configurations to include; repeat or comma-separate.",
        show_default="every trained configuration",
    ),
]
ExportFoldsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--folds",
        "-f",
        help="Folds to include: --folds 0 1, --folds 0,1 or -f 0 -f 1.",
        show_default="every trained fold",
    ),
]
ExportOnnxOption = Annotated[
    bool | None,
    typer.Option(
        "--onnx/--no-onnx",
        help="Also write one ONNX model per fold and deployment.json (for ONNX Runtime, "
        "OpenVINO, TensorRT, C++); --onnx without the onnx extra is an error.",
        show_default="when the onnx extra is installed",
    ),
]
ExportInt8Option = Annotated[
    bool,
    typer.Option(
        "--int8",
        help="Also quantise each fold to INT8 (calibrated on its training cases) and pack it where its "
        "validation Dice stays within 0.002 of fp32 on average and 0.005 worst case; needs the onnx and openvino "
        "extras and the work folder's preprocessed data.",
    ),
]


@app.command(cls=FoldListCommand)
@user_errors
def export(
    output: ExportOutputOption,
    dataset: DatasetNameOption = None,
    configs: ExportConfigsOption = None,
    folds: ExportFoldsOption = None,
    checkpoint: CheckpointOption = None,
    onnx: ExportOnnxOption = None,
    int8: ExportInt8Option = False,
    workdir: WorkdirOption = None,
) -> None:
    """Pack a trained model (plan, weights, fold summaries, ONNX models) into one zip for `predict -m` or `import`.

    Without -c/--folds/--checkpoint it packs what inference.json (autoseg select) chose, when present.
    """
    from autoseg.commands.export import export as export_archive

    _print(
        export_archive(
            workdir=_workdir(workdir),
            output=output,
            dataset=dataset,
            configurations=_split_configs(configs),
            folds=_split_folds(folds),
            checkpoint=checkpoint,
            onnx=onnx,
            int8=int8,
        )
    )


ImportArchiveOption = Annotated[
    Path,
    typer.Argument(
        help="A model archive written by `autoseg export`, or a model trained by nnU-Net v2: its results folder "
        "(DatasetXXX_Name/Trainer__Plans__configuration) or the zip of nnUNetv2_export_model_to_zip.",
        show_default=False,
    ),
]
ImportOverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace the whole folder of a dataset of the same name in the work folder.")
]
ImportDataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        help="nnU-Net models only: the labelled dataset the model learnt from (nnU-Net raw or MSD folder). It is "
        "preprocessed with the imported plan and split as nnU-Net splits (or by its splits_final.json), so that "
        "export --int8 can calibrate and check, and report.json gets its QC references.",
        show_default=False,
    ),
]


@app.command("import")
@user_errors
def import_(
    archive: ImportArchiveOption,
    workdir: WorkdirOption = None,
    overwrite: ImportOverwriteOption = False,
    data: ImportDataOption = None,
    workers: WorkersOption = None,
    progress: ProgressOption = True,
) -> None:
    """Install an exported or nnU-Net-trained model into the work folder, so `autoseg predict` uses it like a
    trained one."""
    from autoseg.commands.import_ import import_archive

    typer.echo(
        import_archive(
            archive=archive,
            workdir=_workdir(workdir),
            overwrite=overwrite,
            data=data,
            workers=workers or os.cpu_count() or 1,
            show_progress=progress,
        )
    )


TuneConfigOption = Annotated[
    str,
    typer.Option("--config", "-c", help="Configuration to tune; the best trial becomes <config>_tuned in plans.json."),
]
TuneFoldsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--folds",
        "-f",
        help="Folds each trial trains and validates on (score: their mean Dice): --folds 0 1, "
        "--folds 0,1 or -f 0 -f 1.",
    ),
]
NTrialsOption = Annotated[
    int,
    typer.Option(
        "--n-trials", min=1, help="Finished (complete or pruned) trials the study should reach, over all workers."
    ),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option("--timeout", min=1, help="Stop starting trials after this many seconds.", show_default="none"),
]
TuneEpochsOption = Annotated[
    int | None,
    typer.Option("--epochs", min=1, help="Epochs per trial and fold (as in autoseg train).", show_default="50"),
]
TuneValIterationsOption = Annotated[
    int | None,
    typer.Option(
        "--val-iterations",
        min=1,
        help="Validation batches per epoch for the pseudo-Dice the pruner sees.",
        show_default="50",
    ),
]
StudyOption = Annotated[
    str | None,
    typer.Option(
        "--study",
        help="Study name; workers with the same name and storage share the study.",
        show_default="the configuration",
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage shared by workers: a database URL (postgresql://user:pw@host/db) or "
        "journal:PATH (a journal file on a shared file system).",
        show_default="sqlite in <workdir>/<dataset>/tuning/<study>.db",
    ),
]
HeartbeatOption = Annotated[
    int,
    typer.Option(
        "--heartbeat",
        min=1,
        help="Seconds between a running trial's heartbeats; a trial silent for 3 of them "
        "(its worker died) is failed and its parameters are run again by another worker.",
    ),
]
SpaceOption = Annotated[
    Path | None,
    typer.Option(
        "--space",
        help="JSON file overriding the search space (see docs/tuning.md).",
        exists=True,
        dir_okay=False,
        show_default="the built-in space",
    ),
]
DimensionsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--dimensions",
        help="Tune only these dimensions (learning_rate, batch_size, width, depth, "
        "augmentation_strength, loss, foreground_fraction, normalization); repeat or comma-separate.",
        show_default="those enabled in the space",
    ),
]
PrunerOption = Annotated[str, typer.Option("--pruner", help="median, hyperband or none.")]
TunedNameOption = Annotated[
    str | None,
    typer.Option(
        "--name", help="Name of the tuned configuration written to plans.json.", show_default="<config>_tuned"
    ),
]
TuneSeedOption = Annotated[
    int,
    typer.Option(
        "--seed", help="Seed of the sampler (plus trials already run) and of every trial's training (plus its number)."
    ),
]
TuneWorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-j",
        min=0,
        help="Augmentation worker processes per trial (0: in the main process).",
        show_default="as in autoseg train",
    ),
]
ReportOption = Annotated[
    bool,
    typer.Option("--report", help="Only print the trials table and parameter importances and write the history PNG."),
]


@app.command(cls=FoldListCommand)
@user_errors
def tune(
    dataset: DatasetNameOption = None,
    config: TuneConfigOption = "3d_fullres",
    workdir: WorkdirOption = None,
    folds: TuneFoldsOption = ["0"],
    n_trials: NTrialsOption = 20,
    timeout: TimeoutOption = None,
    epochs: TuneEpochsOption = None,
    iterations: IterationsOption = None,
    val_iterations: TuneValIterationsOption = None,
    study: StudyOption = None,
    storage: StorageOption = None,
    heartbeat: HeartbeatOption = 60,
    space: SpaceOption = None,
    dimensions: DimensionsOption = None,
    pruner: PrunerOption = "median",
    name: TunedNameOption = None,
    seed: TuneSeedOption = 0,
    device: DeviceOption = "auto",
    workers: TuneWorkersOption = None,
    report: ReportOption = False,
    progress: ProgressOption = True,
) -> None:
    """Tune a configuration with Optuna: short trainings, pruned on pseudo-Dice, best one saved to plans.json."""
    from autoseg.commands.tune import report as study_report
    from autoseg.commands.tune import result_lines, tune_dataset

    if report:
        _print(
            study_report(
                workdir=_workdir(workdir), dataset=dataset, configuration=config, study_name=study, storage=storage
            )
        )
        return
    result = tune_dataset(
        workdir=_workdir(workdir),
        dataset=dataset,
        configuration=config,
        folds=_split_folds(folds) or ["0"],
        n_trials=n_trials,
        timeout=timeout,
        epochs=epochs,
        iterations=iterations,
        val_iterations=val_iterations,
        study_name=study,
        storage=storage,
        space_file=space,
        dimensions=_split_configs(dimensions),
        pruner=pruner,
        seed=seed,
        device=device,
        workers=workers,
        tuned_name=name,
        heartbeat=heartbeat,
        show_progress=progress,
    )
    _print(result_lines(result))


DemoOutputOption = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="Folder for the phantom dataset, the work folder, predictions and overview.png."
    ),
]
DemoCasesOption = Annotated[
    int | None,
    typer.Option("--cases", min=5, help="Training cases of the phantom dataset.", show_default="12 on CPU, 40 on CUDA"),
]
DemoHeldOutOption = Annotated[
    int | None,
    typer.Option(
        "--held-out", min=1, help="Held-out cases predicted and scored at the end.", show_default="4 on CPU, 8 on CUDA"
    ),
]
DemoEpochsOption = Annotated[
    int | None, typer.Option("--epochs", min=1, help="Training epochs.", show_default="40 on CPU, 50 on CUDA")
]
DemoIterationsOption = Annotated[
    int | None,
    typer.Option("--iterations", min=1, help="Training iterations per epoch.", show_default="20 on CPU, 50 on CUDA"),
]
DemoSeedOption = Annotated[int, typer.Option("--seed", help="Seed of the phantoms and of training.")]


@app.command()
@user_errors
def demo(
    output: DemoOutputOption = Path("autoseg_demo"),
    cases: DemoCasesOption = None,
    held_out: DemoHeldOutOption = None,
    epochs: DemoEpochsOption = None,
    iterations: DemoIterationsOption = None,
    device: DeviceOption = "auto",
    seed: DemoSeedOption = 0,
    progress: ProgressOption = True,
) -> None:
    """Run plan -> train -> predict -> evaluate on a built-in brain-tumour phantom (about 10 minutes on 2 CPU cores)."""
    from autoseg.commands import demo as demo_command

    result = demo_command.run_demo(
        output=output,
        cases=cases,
        held_out=held_out,
        epochs=epochs,
        iterations=iterations,
        device=device,
        seed=seed,
        show_progress=progress,
        say=typer.echo,
    )
    _print(demo_command.summary(result))


ShowCaseOption = Annotated[
    str,
    typer.Argument(
        help="An image file (3D, or 4D with all channels), a case folder (BraTS, DICOM series), a channel prefix "
        "(imagesTr/CASE for CASE_0000.nii.gz, ...) or a case id of the planned dataset.",
        show_default=False,
        metavar="CASE",
    ),
]
ShowLabelOption = Annotated[
    Path | None,
    typer.Option(
        "--label",
        "-l",
        help="Ground-truth mask drawn as solid contours.",
        show_default="the case's label file when the dataset has one",
    ),
]
ShowPredOption = Annotated[
    Path | None, typer.Option("--pred", "-p", help="Predicted mask drawn as dashed contours.", show_default=False)
]
ShowOverlayOption = Annotated[
    Path | None,
    typer.Option(
        "--overlay",
        help="A map in [0, 1] drawn as a heat map, e.g. predict --uncertainty's <case>_entropy.nii.gz.",
        show_default=False,
    ),
]
ShowOutputOption = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Image file to write: .png, .jpg, .pdf or .svg.", show_default="<case id>.png"),
]


@app.command()
@user_errors
def show(
    case: ShowCaseOption,
    label: ShowLabelOption = None,
    pred: ShowPredOption = None,
    overlay: ShowOverlayOption = None,
    output: ShowOutputOption = None,
    dataset: DatasetNameOption = None,
    workdir: WorkdirOption = None,
) -> None:
    """Draw every channel of a case in three orientations with label contours, and print its facts."""
    from autoseg.commands.show import show as show_case

    _print(
        show_case(
            case=case, label=label, prediction=pred, overlay=overlay, output=output, dataset=dataset, workdir=workdir
        )
    )


@app.command()
@user_errors
def info(workdir: WorkdirOption = None) -> None:
    """Versions, devices and the work folder: paste this into bug reports."""
    from autoseg.commands.info import info as info_lines

    _print(info_lines(_workdir(workdir)))


if __name__ == "__main__":  # pragma: no cover
    app()
