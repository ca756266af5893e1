"""The docs cannot rot: every ``autoseg`` command shown in README.md and docs/*.md parses with the real CLI.

Command lines in ``bash``/``sh``/``console`` code blocks are parsed by the click command
behind ``autoseg`` (options, values, ranges, required options) without running them;
usage synopses (``[--option VALUE]``) are checked option by option. docs/cli.md must have
a section for every command that names each of its options. The README's commands, the
docs' phantom recipes and every runnable command of the prediction, CPU, evaluation and
MSD/BraTS pages also run, on small phantoms; the other real runs of the workflow are the
end-to-end tests (test_training, test_predict, test_evaluation, test_demo).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import typer.main

from autoseg.cli import app

try:  # typer >= 0.26 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
GROUP = typer.main.get_command(app)


@dataclass(frozen=True)
class Snippet:
    file: Path
    line: int
    text: str  # the autoseg arguments, joined over continuation lines

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: autoseg {self.text}"


def shell_lines(path: Path):
    """(line number, text) of lines inside shell code blocks, continuation lines joined."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\w*)", line)
        if fence:
            in_block = not in_block and fence.group(1) in SHELL_BLOCKS
            continue
        if not in_block:
            continue
        if pending and (pending.endswith("\\") or re.match(r"^\s+\[", line)):  # `\` or a wrapped synopsis
            pending = pending.rstrip("\\") + " " + line.strip()
        else:
            if pending:
                yield start, pending
            pending, start = line.strip().removeprefix("$ "), number
    if pending:
        yield start, pending


def snippets() -> list[Snippet]:
    found = []
    for path in DOC_FILES:
        for number, line in shell_lines(path):
            for segment in re.split(r";|&&|\|\||&\s*$", line.split(" #")[0]):  # `a; b`, `a && b`, `a &`
                match = re.search(r"(?:^|\s)(?:autoseg|-m autoseg\.cli)(?:\s+(.*))?$", segment.strip())
                if match and not segment.strip().startswith(("pip", "python -c")):
                    found.append(Snippet(path, number, (match.group(1) or "").strip()))
    return found


SNIPPETS = snippets()


def option_names(command) -> set[str]:
    return {name for p in command.params for name in (*p.opts, *p.secondary_opts)}


def check_synopsis(snippet: Snippet) -> None:
    """``autoseg plan -d DIR [-w WORKDIR] ...``: the command and every option name must exist."""
    words = [t.strip("[]") for t in snippet.text.split()]
    name = next((w for w in words if not w.startswith("-")), "COMMAND")
    command = GROUP if name == "COMMAND" else GROUP.get_command(typer.Context(GROUP), name)
    assert command is not None, f"{snippet}: no command {name!r}"
    known = option_names(command) | option_names(GROUP)
    for option in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", snippet.text):
        assert option in known, f"{snippet}: the option {option} does not exist (known: {', '.join(sorted(known))})"


def check_command_line(snippet: Snippet) -> None:
    """Parse the line exactly as ``autoseg`` would, without running the command."""
    args = shlex.split(snippet.text)
    try:
        with GROUP.make_context("autoseg", list(args)) as ctx:
            name, command, rest = GROUP.resolve_command(ctx, [*getattr(ctx, "_protected_args", ()), *ctx.args])
            command.make_context(name, rest, parent=ctx)
    except typer.Exit:
        return  # --version, --help
    except UsageError as exc:
        raise AssertionError(f"{snippet}: {exc.format_message()}") from None


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_documented_command_parses(snippet: Snippet):
    if "[" in snippet.text:
        check_synopsis(snippet)
    else:
        check_command_line(snippet)


def test_docs_show_the_main_commands():
    shown = {s.text.split()[0] for s in SNIPPETS if s.text}
    assert {"demo", "show", "plan", "train", "predict", "evaluate"} <= shown, shown


def cli_sections() -> dict[str, str]:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    parts = re.split(r"^## autoseg (\w[\w-]*)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("name", sorted(GROUP.list_commands(typer.Context(GROUP))))
def test_cli_reference_covers_every_option(name):
    """docs/cli.md has a section per command naming every option (or links the page that does)."""
    sections = cli_sections()
    assert name in sections, f"docs/cli.md has no '## autoseg {name}' section"
    text = sections[name]
    for linked in set(re.findall(r"\]\(([\w-]+\.md)", text)):
        text += (ROOT / "docs" / linked).read_text(encoding="utf-8")
    command = GROUP.get_command(typer.Context(GROUP), name)
    missing = [
        max(p.opts, key=len)
        for p in command.params
        if p.param_type_name == "option"
        and not any(re.search(rf"{re.escape(o)}(?![\w-])", text) for o in (*p.opts, *p.secondary_opts))
    ]
    assert not missing, f"docs/cli.md, section 'autoseg {name}': options not documented: {', '.join(missing)}"


def test_checker_names_file_line_and_bad_option():
    bad = Snippet(ROOT / "docs" / "cli.md", 7, "train --fold 0 --epoch 5")
    with pytest.raises(AssertionError, match=r"docs/cli.md:7: .*--epoch"):
        check_command_line(bad)
    with pytest.raises(AssertionError, match=r"docs/cli.md:7: .*--nope"):
        check_synopsis(Snippet(ROOT / "docs" / "cli.md", 7, "plan -d DIR [--nope]"))
    with pytest.raises(AssertionError, match="No such command"):
        check_command_line(Snippet(ROOT / "README.md", 3, "trian --fold 0"))


def phantom_recipes() -> list[tuple[Path, int, str, list[str]]]:
    """Doc blocks that write a phantom with ``python -c`` and plan it: (file, line, code, plan argument lists)."""
    recipes = []
    for path in DOC_FILES:
        lines = list(shell_lines(path))
        for i, (number, line) in enumerate(lines):
            if line.startswith("python -c") and "synthetic." in line:
                plans = [
                    shlex.split(text.split(" #")[0])[1:]
                    for _, text in lines[i + 1 : i + 3]
                    if text.startswith("autoseg plan")
                ]
                recipes.append((path, number, shlex.split(line)[2], plans))
    return recipes


@pytest.mark.parametrize("recipe", phantom_recipes(), ids=lambda r: f"{r[0].name}:{r[1]}")
def test_phantom_recipes_run(recipe, tmp_path, monkeypatch, run_cli):
    """The copy-and-paste phantom recipes of the docs really write a dataset that plans."""
    path, number, code, plans = recipe
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path.name}:{number}", "exec"), {})
    assert plans, f"{path.name}:{number}: the phantom recipe is not followed by an `autoseg plan` line"
    for args in plans:
        result = run_cli(*args, "--no-preprocess", "--no-progress")
        assert result.exit_code == 0, f"{path.name}:{number}: autoseg {' '.join(args)}\n{result.output}"


def test_plan_file_reference_names_every_plan_field():
    import dataclasses

    from autoseg.core import plan

    text = (ROOT / "docs" / "plan-file.md").read_text(encoding="utf-8")
    classes = [c for c in vars(plan).values() if dataclasses.is_dataclass(c) and c.__module__ == plan.__name__]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f"`{f.name}`" not in text]
    assert classes and not missing, f"docs/plan-file.md does not describe: {', '.join(missing)}"


#: What a test adds to the README's long-running commands; every other word runs as written.
TEST_BUDGET = {
    "demo": [
        "--cases",
        "5",
        "--held-out",
        "1",
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ],
    "train": [
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
    ],
}


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path, monkeypatch, run_cli):
    """The README's `autoseg` lines, in order, in a fresh folder holding a Task01-layout phantom."""
    import nibabel as nib

    from autoseg.phantoms import synthetic

    monkeypatch.chdir(tmp_path)
    synthetic.write_msd_brain(tmp_path / "Task01_BrainTumour", 5, shape=(32, 40, 36), n_test=1)
    readme = [s for s in SNIPPETS if s.file.name == "README.md"]
    assert [s.text.split()[0] for s in readme] == ["demo", "show", "plan", "train", "predict"]
    for snippet in readme:
        args = shlex.split(snippet.text)
        result = run_cli(*args, *TEST_BUDGET.get(args[0], []))
        assert result.exit_code == 0, f"{snippet}\n{result.output}"
    assert (tmp_path / "case.png").stat().st_size > 1000 and (tmp_path / "autoseg_work").is_dir()
    image = nib.load(tmp_path / "Task01_BrainTumour" / "imagesTs" / "BRATS_006.nii.gz")
    mask = nib.load(tmp_path / "masks" / "BRATS_006.nii.gz")
    assert mask.shape == image.shape[:3] and (mask.affine == image.affine).all()


#: Pages whose command blocks run for real, in order, in a folder laid out as the page assumes.
RUN_PAGES = ("prediction.md", "predict-on-cpu.md", "evaluation.md", "msd-and-brats.md")
#: Lines that need what a test cannot have (other machines, BraTS data, a database, a shell variable).
NOT_RUNNABLE = ("~", "/scratch", "/shared", "/tmp/", "$", "postgresql", "brats_", "BraTS2021")


@pytest.fixture(scope="module")
def doc_sandbox(tmp_path_factory) -> Path:
    """./autoseg_work with two trained folds of a Task01-layout phantom, and the folders the pages name."""
    import shutil

    from autoseg.commands.plan import plan_dataset
    from autoseg.phantoms import synthetic
    from autoseg.training.trainer import train_fold

    root = tmp_path_factory.mktemp("docs")
    dataset = synthetic.write_msd_brain(root / "Task01_BrainTumour", 5, shape=(32, 40, 36), n_test=2)
    plan_dataset(dataset_dir=dataset, workdir=root / "autoseg_work", configurations=["3d_fullres"], show_progress=False)
    for fold in ("0", "1"):
        train_fold(
            workdir=root / "autoseg_work",
            fold=fold,
            epochs=1,
            iterations=2,
            val_iterations=1,
            workers=0,
            device="cpu",
            show_progress=False,
        )
    for name, source in {
        "scans": "imagesTs",
        "val_images": "imagesTs",
        "truth": "labelsTs",
        "val_truth": "labelsTs",
        "predictions": "labelsTr",
    }.items():
        shutil.copytree(dataset / source, root / name)
    return root


def page_commands(page: str) -> list[Snippet | str]:
    """The page's runnable ``autoseg`` commands and ``python -c`` phantom recipes (as code), in page order."""
    recipes = {
        number: shlex.split(line)[2]
        for number, line in shell_lines(ROOT / "docs" / page)
        if line.startswith("python -c") and "synthetic." in line
    }
    snippets = {
        s.line: s
        for s in SNIPPETS
        if s.file.name == page and "[" not in s.text and not any(marker in s.text for marker in NOT_RUNNABLE)
    }
    return [{**recipes, **snippets}[n] for n in sorted({*recipes, *snippets})]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_commands_run(page, doc_sandbox, tmp_path, monkeypatch, run_cli):
    """Each runnable command of the page, as written, in order."""
    import shutil

    import torch

    commands = page_commands(page)
    assert commands, f"{page} has no runnable command"
    work = tmp_path / "here"
    shutil.copytree(doc_sandbox, work)
    threads = torch.get_num_threads()  # `predict --threads 8` changes it for the whole test process
    try:
        for snippet in commands:
            run_page_command(snippet, work, tmp_path / "another_machine", monkeypatch, run_cli)
    finally:
        torch.set_num_threads(threads)


def run_page_command(snippet: Snippet | str, work: Path, other_machine: Path, monkeypatch, run_cli) -> None:
    """Run one documented command in ``work``; a predict starts from an empty output folder, and
    ``import`` runs on "another machine" (a folder holding only the archive)."""
    import shutil

    if isinstance(snippet, str):  # a phantom recipe
        monkeypatch.chdir(work)
        exec(compile(snippet, "recipe", "exec"), {})
        return
    args = shlex.split(snippet.text)
    cwd = work
    if args[0] == "import":
        cwd = other_machine
        cwd.mkdir(exist_ok=True)
        shutil.copy(work / args[1], cwd / args[1])
    if args[0] == "predict":
        shutil.rmtree(work / args[args.index("-o") + 1], ignore_errors=True)
    monkeypatch.chdir(cwd)
    result = run_cli(*args, *TEST_BUDGET.get(args[0], []))
    assert result.exit_code == 0, f"{snippet}\n{result.output}"
    if args[0] == "predict":
        assert len(list((work / args[args.index("-o") + 1]).glob("*.nii.gz"))) == 2, snippet
