"""The README's usage blocks match the CLI: every flag they show exists, and every option of a
command appears in its block."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from safealign.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def commands() -> dict[str, click.Command]:
    """Every leaf command by its path (``lab build``, ``eval``, ...)."""
    found = {}
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            found.update({f"{name} {sub}": c for sub, c in command.commands.items()})
        else:
            found[name] = command
    return found


def usage_blocks() -> list[str]:
    """The first bash block of each ``### <command>`` section under ``## Usage``."""
    usage = README.read_text().split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for section in usage.split("\n### ")[1:]:
        match = re.search(r"```bash\n(.*?)```", section, re.S)
        if match:
            blocks.append(match.group(1))
    return blocks


def flags_by_command() -> dict[str, set[str]]:
    """The flags each command line of the usage blocks shows (continuations joined)."""
    shown: dict[str, set[str]] = {}
    paths = sorted(commands(), key=len, reverse=True)
    for block in usage_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            text = line.strip().removeprefix("safealign ")
            path = next((p for p in paths if text.startswith(p + " ")), None)
            assert path is not None, f"usage line of no command: {line}"
            shown.setdefault(path, set()).update(FLAG.findall(text))
    return shown


def cli_flags(command: click.Command) -> tuple[set[str], list[set[str]]]:
    """(every flag the command accepts, the visible options as sets of their spellings)."""
    ctx = click.Context(command)
    accepted, visible = set(), []
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        spellings = {o for o in param.opts + param.secondary_opts if o.startswith("--")}
        accepted |= spellings
        if not param.hidden and param is not command.get_help_option(ctx):
            visible.append(spellings)
    return accepted, visible


SHOWN = flags_by_command()


def test_every_command_has_a_usage_line():
    assert set(SHOWN) == set(commands())


@pytest.mark.parametrize("path", sorted(commands()))
def test_usage_block_matches_the_cli(path):
    accepted, visible = cli_flags(commands()[path])
    shown = SHOWN[path]
    assert shown - accepted == set(), f"{path}: the README shows flags the CLI lacks"
    missing = [sorted(s)[0] for s in visible if not s & shown]
    assert missing == [], f"{path}: options missing from the README's usage block"


def test_the_quick_start_uses_only_flags_the_cli_has():
    text = README.read_text()
    quick = text.split("## Quick start on your own model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("safealign "):
            continue
        path = line.split()[1]
        accepted, _ = cli_flags(commands()[path])
        assert set(FLAG.findall(line)) <= accepted, line
