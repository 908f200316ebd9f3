"""``safealign recover``: parse, call :func:`safealign.recover.recover`, print.

The inputs (models, prompt and task files) are written here; every other option is generated
from :class:`~safealign.recover.settings.RecoverSettings`.
"""

from __future__ import annotations

import click

from safealign.command import handles_bad_input
from safealign.recover.api import recover
from safealign.recover.report import summary
from safealign.recover.settings import RecoverSettings
from safealign.settings import click_options, from_cli


@click.command("recover")
@click.option("--aligned", required=True, type=click.Path(), help="Aligned model folder (A).")
@click.option(
    "--finetuned",
    required=True,
    type=click.Path(),
    help="Fine-tuned model folder or LoRA adapter on A (B).",
)
@click.option("--out", type=click.Path(), help="Output folder (C). Required unless --dry-run.")
@click.option(
    "--harmful", type=click.Path(), help="Harmful prompts for the direction [bundled set]."
)
@click.option(
    "--eval-harmful", type=click.Path(), help="Harmful prompts scored per step [--harmful]."
)
@click.option(
    "--task", type=click.Path(), help="Held-out task data with answers; utility is checked on it."
)
@click.option(
    "--task-train",
    type=click.Path(),
    help="Task data whose prompts steer the rollback gradient [first half of --task; "
    "the check then uses the second half].",
)
@click.option(
    "--benign", type=click.Path(), help="Benign prompts; over-refusal is checked with utility."
)
@click_options(RecoverSettings)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan; load and write nothing.")
@handles_bad_input
def recover_command(**values) -> None:
    """Restore a fine-tuned model's safety by resetting a few weights to aligned values."""
    settings, inputs = from_cli(RecoverSettings, values)
    if inputs["out"] is None and not inputs["dry_run"]:
        raise click.UsageError("--out is required (or use --dry-run)")
    result = recover(settings=settings, **inputs)
    if inputs["dry_run"]:
        click.echo(result.plan.describe())
        for note in result.warnings:
            click.echo(f"warning: {note}", err=True)
        return
    click.echo(summary(result))
