"""What every ``safealign`` command shares: the bad-input rule and ``--debug``.

Bad input (a setting out of range, a missing or unreadable file, a checkpoint that cannot be
used, malformed data or YAML) is reported in one line on stderr with exit status 2, no
traceback unless ``--debug``. Exit status 1 stays for "the command ran and the result failed"
(a release gate, the lab's phenomenon check).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import click
import yaml

#: Exit status of a command refused for bad input (click's own usage errors use it too).
BAD_INPUT = 2

#: Errors meaning "the input is wrong": every project error derives from ValueError.
INPUT_ERRORS = (ValueError, OSError, yaml.YAMLError)


class BadInput(click.ClickException):
    """One line on stderr, exit status 2."""

    exit_code = BAD_INPUT


def one_line(error: BaseException) -> str:
    """The error's message on one line, several problems joined by "; " (its type's name when
    it has no message)."""
    lines = (" ".join(line.split()) for line in str(error).splitlines())
    text = "; ".join(line for line in lines if line)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    return text or type(error).__name__


def handles_bad_input(command: Callable) -> Callable:
    """Decorate a click command: add ``--debug`` and apply the bad-input rule to its body."""

    @click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except INPUT_ERRORS as error:
            if debug:
                raise
            raise BadInput(one_line(error)) from None

    return wrapper


class OneLineGroup(click.Group):
    """A command group whose subcommands' usage errors (a bad or missing option, caught by
    click while parsing) follow the bad-input rule too: one line, exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise BadInput(error.format_message()) from None
