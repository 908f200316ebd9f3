"""What every ``safealign`` command shares: one vocabulary of flags, grouped help with
examples, the bad-input rule, ``--debug`` and ``--allow-pickle``.

Bad input (a setting out of range, a missing or unreadable file, a checkpoint that cannot be
used, malformed data or YAML) is reported in one line on stderr with exit status 2, no
traceback unless ``--debug``. Exit status 1 stays for "the command ran and the result failed"
(a release gate, the lab's phenomenon check).

A flag of :data:`VOCABULARY` means the same in every command that takes it: its help starts
with the same words, whether the option is written here (:func:`shared`) or generated from a
settings field (:func:`safealign.settings.click_options`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import click
import yaml

from safealign.checkpoint import files as checkpoint_files

#: Exit status of a command refused for bad input (click's own usage errors use it too).
BAD_INPUT = 2

#: Errors meaning "the input is wrong": every project error derives from ValueError.
INPUT_ERRORS = (ValueError, OSError, yaml.YAMLError)

#: The shared flags and what each means, in every command that takes it.
VOCABULARY: dict[str, str] = {
    "--out": "Output folder.",
    "--device": "Torch device: cpu, cuda, cuda:1, ...",
    "--dtype": "Weights dtype: auto, float32, bfloat16 (bf16), float16 (fp16).",
    "--batch-size": "Prompts per generation batch.",
    "--grad-batch-size": "Examples per gradient batch.",
    "--limit": "Use only the first N items of each prompt or task set.",
    "--seed": "Random seed.",
    "--json": "Print the result as JSON on stdout, nothing else there.",
    "--quiet": "No progress lines on stderr.",
    "--debug": "Show the full traceback of an error.",
    "--allow-pickle": "Also read pickled .bin/.pt weights, with torch.load(weights_only=True): "
    "trusted files only.",
}

#: The help section of the shared flags.
COMMON = "Common options"


def shared_help(flag: str, detail: str | None = None) -> str:
    """The vocabulary's meaning of ``flag``, then what it adds in one command."""
    return VOCABULARY[flag] + (f" {detail}" if detail else "")


class OldSpelling(DeprecationWarning):
    """A setting written the way an earlier release spelled it: still accepted for one
    release; the message names the new spelling. A command shows it as a warning line."""


class BadInput(click.ClickException):
    """One line on stderr, exit status 2."""

    exit_code = BAD_INPUT


class Option(click.Option):
    """A click option that knows its help section (``group``)."""

    def __init__(self, *args: Any, group: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group or (COMMON if set(self.opts) & set(VOCABULARY) else None)


class Command(click.Command):
    """Help that teaches: the purpose, the options by section, then examples.

    ``examples`` are command lines shown under "Examples", after the help ``sections`` (title:
    rows of term and text); the top-level list shows the first line of the help in full
    (``short_help``).
    """

    def __init__(
        self,
        *args: Any,
        examples: Sequence[str] = (),
        sections: dict[str, list[tuple[str, str]]] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.examples = tuple(examples)
        self.sections = sections or {}
        if self.help and not self.short_help:
            self.short_help = inspect.cleandoc(self.help).splitlines()[0].rstrip(".")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        current = "Options"  # an option without a group stays in the one before it
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or not isinstance(param, click.Option):
                continue  # arguments are described in the help text
            group = getattr(param, "group", None)
            if param is self.get_help_option(ctx):
                group = COMMON
            elif group is None:
                group = current
            elif group != COMMON:
                current = group
            sections.setdefault(group, []).append(record)
        if COMMON in sections:
            sections[COMMON] = sections.pop(COMMON)  # the shared flags last
        for name, records in sections.items():
            with formatter.section(name):
                formatter.write_dl(records)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, rows in self.sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)
        if self.examples:
            with formatter.section("Examples"):
                for example in self.examples:  # as typed: a shell line is not re-wrapped
                    for line in example.splitlines():
                        formatter.write(" " * formatter.current_indent + line + "\n")
        super().format_epilog(ctx, formatter)


def command(name: str, *, examples: Sequence[str], **kwargs: Any) -> Callable:
    """``click.command`` with :class:`Command` (grouped help, ``sections``, examples)."""
    return click.command(name, cls=Command, examples=examples, **kwargs)


def option(*decls: str, group: str | None = None, **kwargs: Any) -> Callable:
    """``click.option`` in help section ``group``, defaults shown."""
    kwargs.setdefault("show_default", True)
    return click.option(*decls, cls=Option, group=group, **kwargs)


def shared(
    flag: str, detail: str | None = None, *, name: str | None = None, **kwargs: Any
) -> Callable:
    """A vocabulary flag (parameter ``name``, by default the flag's): the shared help plus
    ``detail``, in the common section."""
    if flag in ("--json", "--quiet", "--debug", "--allow-pickle"):
        kwargs.update(is_flag=True, show_default=False)
    decls = (flag, name) if name else (flag,)
    return option(*decls, help=shared_help(flag, detail), **kwargs)


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"warning: {message}", err=True)


def deprecated(old: str, new: str, name: str, **kwargs: Any) -> Callable:
    """Keep flag ``old`` working for a release as a hidden alias of ``new`` (parameter
    ``name``), with a warning; ``new`` wins when both are given."""
    alias = "deprecated_" + old.lstrip("-").replace("-", "_")

    def decorate(function: Callable) -> Callable:
        @click.option(old, alias, hidden=True, default=None, **kwargs)
        @functools.wraps(function)
        def wrapper(*args: Any, **values: Any) -> Any:
            value = values.pop(alias)
            if value is not None and value != () and value is not False:
                warn(f"{old} is deprecated; use {new}")
                ctx = click.get_current_context()
                if ctx.get_parameter_source(name) in (None, click.core.ParameterSource.DEFAULT):
                    values[name] = value
            return function(*args, **values)

        return wrapper

    return decorate


def one_line(error: BaseException) -> str:
    """The error's message on one line, several problems joined by "; " (its type's name when
    it has no message)."""
    lines = (" ".join(line.split()) for line in str(error).splitlines())
    text = "; ".join(line for line in lines if line)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    return text or type(error).__name__


def quiet_libraries() -> None:
    """In our commands (not for API users): no transformers loading bars, no known
    deprecation warnings of the libraries; our own progress lines stay."""
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    for module in ("transformers", "peft", "accelerate", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


@contextlib.contextmanager
def old_spellings_as_warnings():
    """Within: each :class:`OldSpelling` is one warning line on stderr (once per message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("once", OldSpelling)
        show = warnings.showwarning

        def shown(message, category, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, OldSpelling):
                warn(str(message))
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = shown
        yield


def handles_bad_input(command: Callable) -> Callable:
    """Decorate a click command: add ``--debug``, quiet the libraries (:func:`quiet_libraries`),
    show old spellings as warning lines and apply the bad-input rule to its body."""

    @shared("--debug")
    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        quiet_libraries()
        _interrupt_on_sigterm()
        try:
            with old_spellings_as_warnings():
                return command(*args, **kwargs)
        except click.ClickException:
            raise
        except INPUT_ERRORS as error:
            if debug:
                raise
            raise BadInput(one_line(error)) from None

    return wrapper


def _interrupt_on_sigterm() -> None:
    """SIGTERM interrupts like Ctrl-C, so a terminated run discards its temporary output the
    way an interrupted one does (the writers hold both back while they swap folders)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def reads_checkpoints(command: Callable) -> Callable:
    """Decorate a command that reads checkpoints: ``--allow-pickle`` runs its body inside
    :func:`safealign.checkpoint.files.allow_pickle`."""

    @shared("--allow-pickle")
    @functools.wraps(command)
    def wrapper(*args, allow_pickle: bool, **kwargs):
        with checkpoint_files.allow_pickle() if allow_pickle else contextlib.nullcontext():
            return command(*args, **kwargs)

    return wrapper


class OneLineGroup(click.Group):
    """A command group whose subcommands' usage errors (a bad or missing option, caught by
    click while parsing) follow the bad-input rule too: one line, exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise BadInput(error.format_message()) from None
