"""Command-line parsing that is autoseg's own (not typer's): fold lists."""

from __future__ import annotations

import pytest
import typer.main

from autoseg.cli import app

GROUP = typer.main.get_command(app)


def parsed(*args: str) -> dict:
    with GROUP.make_context("autoseg", list(args)) as ctx:
        name, command, rest = GROUP.resolve_command(ctx, [*getattr(ctx, "_protected_args", ()), *ctx.args])
        return command.make_context(name, rest, parent=ctx).params


@pytest.mark.parametrize(
    "args, folds",
    [
        (["--folds", "0", "1", "2", "3", "4"], ["0", "1", "2", "3", "4"]),  # nnU-Net's way
        (["-f", "0", "-f", "3"], ["0", "3"]),
        (["--folds", "0,1"], ["0,1"]),  # split later, by the command
        (["--folds", "all"], ["all"]),
    ],
)
def test_folds_take_several_values_in_a_row(args, folds):
    assert parsed("predict", "-i", "in", *args, "-o", "out", "--fast")["folds"] == folds
    assert parsed("export", "-o", "m.zip", *args)["folds"] == folds
    assert parsed("tune", *args, "--n-trials", "2")["folds"] == folds


def test_a_word_after_the_folds_that_is_no_fold_is_still_an_error():
    with pytest.raises(Exception, match="unexpected extra argument"):
        parsed("predict", "-i", "in", "-o", "out", "--folds", "0", "1", "extra")
    assert parsed("train", "--fold", "2", "--epochs", "3")["fold"] == "2"  # train's single fold is untouched


def test_an_explicit_step_wins_over_fasts():
    from autoseg.commands.predict import PredictOptions

    def options(*args: str) -> PredictOptions:
        params = parsed("predict", "-i", "in", "-o", "out", *args)
        return PredictOptions(
            input=params["input"], output=params["output"], step_size=params["step"], fast=params["fast"]
        )

    assert options().step == 0.5 and options("--fast").step == 0.75
    assert options("--fast", "--step", "0.5").step == 0.5 and not options("--fast", "--step", "0.5").tta
    assert options("--step", "0.6").step == 0.6


@pytest.mark.parametrize("option", [["--val-every", "2"], ["--early-stop", "3"]])
def test_fold_all_with_validation_during_training_is_refused(option, tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["train", "-w", str(tmp_path), "--fold", "all", *option])
    assert result.exit_code == 2 and "--fold all holds no case out" in result.output, result.output
    assert option[0] in result.output


def test_the_final_validation_flag_says_what_it_does():
    assert parsed("train", "--no-final-validation")["validate"] is False
    assert parsed("train", "--no-validate")["validate"] is False  # the older name still works
    assert parsed("train")["validate"] is True


def test_no_environment_variable_moves_the_work_folder(tmp_path, monkeypatch, caplog):
    """Every path comes from the command line: an AUTOSEG_HOME left from older versions is named, not followed."""
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOSEG_HOME", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere" / "Dataset").mkdir(parents=True)
    result = CliRunner().invoke(app, ["train", "--fold", "0"])
    assert result.exit_code == 1, result.output
    assert "autoseg_work" in result.output and "elsewhere" not in result.output.replace("\n", "")
    assert "AUTOSEG_HOME is not read" in caplog.text + result.output
