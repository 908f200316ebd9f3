"""``safealign recover``: parse, call :func:`safealign.recover.recover`, print.

The inputs (models, prompt and task files) are written here; every other option is generated
from :class:`~safealign.recover.settings.RecoverSettings`.
"""

from __future__ import annotations

import json
import sys
import warnings

import click

from safealign.command import (
    BadInput,
    command,
    handles_bad_input,
    option,
    reads_checkpoints,
    shared,
    warn,
)
from safealign.eval.smoke import SMOKE_HARMFUL, smoke_warning
from safealign.recover.api import RecoverInputs, recover
from safealign.recover.report import summary
from safealign.recover.settings import RecoverSettings
from safealign.settings import click_options, from_cli

EXAMPLES = (
    "safealign recover --aligned meta-llama/Llama-3.2-1B-Instruct --finetuned my-lora/ \\\n"
    "    --harmful h.jsonl --task t.jsonl --benign b.jsonl --out recovered/",
    "safealign recover --aligned A --finetuned B --task t.jsonl --dry-run",
)


def pair_inputs(function):
    """The --aligned and --finetuned options of the post-hoc commands, in that order."""
    function = option(
        "--finetuned",
        required=True,
        help="Fine-tuned model B, or a LoRA adapter on A: folder or hub id.",
    )(function)
    return option(
        "--aligned", required=True, group="Inputs", help="Aligned model A: folder or hub id."
    )(function)


@command(
    "recover",
    examples=EXAMPLES,
    short_help="Restore refusals by resetting a few weights to aligned values.",
)
@pair_inputs
@option(
    "--harmful",
    type=click.Path(),
    show_default="bundled smoke set",
    help="Harmful prompts for the direction.",
)
@option(
    "--eval-harmful",
    type=click.Path(),
    show_default="--harmful",
    help="Harmful prompts scored per step.",
)
@option(
    "--task",
    type=click.Path(),
    help="Held-out task data with answers: utility is checked on it (required, or "
    "--utility drift, or --no-utility-check).",
)
@option(
    "--task-train",
    type=click.Path(),
    show_default="first half of --task; the check then uses the second half",
    help="Task data whose prompts steer the rollback gradient.",
)
@option(
    "--benign",
    type=click.Path(),
    help="Benign prompts whose over-refusal is checked with utility (the second half, "
    "without --benign-train).",
)
@option(
    "--benign-train",
    type=click.Path(),
    show_default="first half of --benign; the check then uses the second half",
    help="Benign prompts that steer the rollback gradient.",
)
@option(
    "--no-utility-check",
    is_flag=True,
    help="Run without --task: no utility check, no rollback.",
)
@click_options(RecoverSettings)
@shared("--out", "Required unless --dry-run.", type=click.Path())
@shared("--json", "Prints report.json (with --dry-run: the plan in it).", name="as_json")
@shared("--quiet")
@reads_checkpoints
@handles_bad_input
def recover_command(
    out: str | None, no_utility_check: bool, as_json: bool, quiet: bool, **values
) -> None:
    """Restore refusals by resetting a few weights to their aligned values.

    The harmful direction of A at --layer steers a gradient; each step resets the top --rate
    of sign-agreeing weights of B to A's values, with utility checked on --task. Exits 1 when
    no repair held (nothing is written unless --write-unchanged) or when the kept state is
    more harmful than A by over --harmful-margin (written).
    """
    settings, given = from_cli(RecoverSettings, values)
    inputs = RecoverInputs(**given)
    if out is None and not settings.dry_run:
        raise click.UsageError("--out is required (or use --dry-run)")
    if inputs.task is None and not no_utility_check and settings.drift_max is None:
        raise BadInput(
            "--task is required: without task data nothing checks that the model still does "
            "its task (pass --utility drift with --benign, or --no-utility-check to run anyway)"
        )
    if inputs.harmful is None:
        warn(smoke_warning("--harmful", SMOKE_HARMFUL))
    with warnings.catch_warnings():  # the API's warnings, printed below as one line each
        warnings.simplefilter("ignore", UserWarning)
        result = recover(inputs, settings, out, None if quiet else _say)
    for note in result.warnings:
        warn(note)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif settings.dry_run:
        click.echo(result.plan.describe())
    else:
        click.echo(summary(result))
    if result.failure:  # a result that failed never exits 0
        written = f"wrote {result.out} unchanged" if result.out else "nothing written"
        click.echo(f"no repair held: {result.failure}; {written}", err=True)
        sys.exit(1)
    if result.shortfall:
        click.echo(f"repair incomplete: {result.shortfall}; wrote {result.out}", err=True)
        sys.exit(1)


def _say(line: str) -> None:
    click.echo(f"recover: {line}", err=True)
