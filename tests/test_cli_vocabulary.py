"""One vocabulary of flags: each shared flag is taken by the commands it fits, with the same
meaning (help) and the same parsing; every command's help has groups and examples."""

from __future__ import annotations

import contextlib

import click
import pytest
from click.testing import CliRunner
from test_cli_readme import commands

import safealign.command as command_module
from safealign.cli import main
from safealign.command import COMMON, VOCABULARY

#: The commands that every one of some shared flags (--out, --quiet, --debug) belongs to.
EVERY_COMMAND = {
    "eval",
    "recover",
    "safetylock",
    "merge",
    "retrain",
    "compare",
    "lab build",
    "demo",
}
#: Which commands take which shared flag.
TAKEN = {
    "--out": EVERY_COMMAND,
    "--device": {"eval", "recover", "safetylock", "merge", "compare"},
    "--dtype": {"eval", "recover", "merge", "retrain"},
    "--batch-size": {"eval", "recover", "safetylock", "compare"},
    "--grad-batch-size": {"recover", "retrain"},
    "--limit": {"eval", "recover", "compare"},
    "--seed": {"eval", "merge", "retrain", "compare", "safetylock", "lab build", "demo"},
    "--json": {"eval", "recover", "safetylock", "merge", "compare"},
    "--quiet": EVERY_COMMAND,
    "--debug": EVERY_COMMAND,
    "--allow-pickle": {"eval", "recover", "safetylock", "merge", "retrain", "compare"},
}
#: A value each flag parses, and what the command's parameter then holds.
VALUES = {
    "--out": ("o", "o"),
    "--device": ("cpu", "cpu"),
    "--dtype": ("bf16", "bf16"),
    "--batch-size": ("4", 4),
    "--grad-batch-size": ("4", 4),
    "--limit": ("3", 3),
    "--seed": ("7", 7),
}


def option_of(command: click.Command, flag: str) -> click.Option | None:
    ctx = click.Context(command)
    found = [p for p in command.get_params(ctx) if flag in getattr(p, "opts", ())]
    return found[0] if found else None


def test_every_shared_flag_is_in_the_vocabulary():
    assert set(TAKEN) == set(VOCABULARY)


@pytest.mark.parametrize("flag", sorted(TAKEN))
def test_a_shared_flag_means_the_same_in_every_command(flag):
    having = set()
    for path, cmd in commands().items():
        option = option_of(cmd, flag)
        if option is None or option.hidden:
            continue
        having.add(path)
        assert option.help.startswith(VOCABULARY[flag]), (path, option.help)
        assert option.group == COMMON, path
    assert having == TAKEN[flag]


@pytest.mark.parametrize("flag", sorted(VALUES))
def test_a_shared_flag_parses_the_same_in_every_command(flag):
    text, parsed = VALUES[flag]
    for path in sorted(TAKEN[flag]):
        cmd = commands()[path]
        required = [
            arg for p in cmd.params if p.required and p.opts[0] != flag for arg in (p.opts[0], "x")
        ]
        ctx = cmd.make_context(path, [*required, flag, text], resilient_parsing=False)
        value = ctx.params[option_of(cmd, flag).name]
        assert str(value) == str(parsed), (path, value)


@pytest.mark.parametrize("path", sorted(commands()))
def test_help_has_a_purpose_groups_and_examples(path):
    result = CliRunner().invoke(main, [*path.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert f"\n{COMMON}:\n" in result.output
    examples = result.output.split("\nExamples:\n", 1)[1]
    assert examples.count(f"safealign {path}") >= 2


def test_the_command_list_shows_each_purpose_on_one_line():
    output = CliRunner().invoke(main, ["--help"]).output
    lines = output.split("Commands:\n", 1)[1].splitlines()
    assert len([line for line in lines if line.strip()]) == len(main.commands)
    assert not any(line.rstrip().endswith("...") for line in lines)


def test_allow_pickle_runs_the_command_inside_the_checkpoint_opt_in(tmp_path, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def opt_in():
        entered.append(True)
        yield

    monkeypatch.setattr(command_module.checkpoint_files, "allow_pickle", opt_in)
    missing = str(tmp_path / "missing")
    args = ["recover", "--aligned", missing, "--finetuned", missing, "--dry-run"]
    args += ["--no-utility-check", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 2
    assert entered == []
    assert CliRunner().invoke(main, [*args, "--allow-pickle"]).exit_code == 2
    assert entered == [True]


def test_a_list_option_left_out_takes_its_empty_default():
    from safealign.recover.cli import recover_command
    from safealign.recover.settings import RecoverSettings
    from safealign.settings import from_cli

    ctx = recover_command.make_context("recover", ["--aligned", "a", "--finetuned", "b"])
    with ctx:
        settings, _ = from_cli(RecoverSettings, ctx.params)
    assert settings.sweep == ()
