"""``safealign recover``: parse, call :func:`safealign.recover.recover`, print."""

from __future__ import annotations

import click

from safealign.checkpoint import CheckpointError
from safealign.recover.loop import recover
from safealign.recover.report import summary


def _rates(_ctx, _param, value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


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
@click.option("--task", type=click.Path(), help="Held-out task data with answers; drives rollback.")
@click.option(
    "--benign", type=click.Path(), help="Benign prompts; over-refusal is checked with utility."
)
@click.option(
    "--refusal-rise",
    type=float,
    default=0.05,
    show_default=True,
    help="Allowed over-refusal rise above max(A, B), with --benign.",
)
@click.option("--layer", type=int, help="Direction layer L [floor(4n/6); n under 12 layers].")
@click.option(
    "--rate", type=float, default=0.002, show_default=True, help="Share restored per step."
)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, help="First step checked [5; 1 under 12 layers].")
@click.option(
    "--metric-drop",
    type=float,
    default=0.05,
    show_default=True,
    help="Allowed relative utility drop.",
)
@click.option(
    "--rollback-rate",
    type=float,
    default=0.2,
    show_default=True,
    help="Share of a step rolled back.",
)
@click.option("--judge", default="keyword", show_default=True, help="Harmful-response judge.")
@click.option("--metric", default="exact_match", show_default=True, help="Task metric.")
@click.option("--device", help="cpu, cuda, cuda:1, ... [cpu]")
@click.option("--dtype", help="Working and output dtype [the fine-tuned checkpoint's].")
@click.option(
    "--batch-size", type=int, default=8, show_default=True, help="Prompts per gradient batch."
)
@click.option(
    "--max-prompts", type=int, default=256, show_default=True, help="Harmful prompts used."
)
@click.option(
    "--sweep", callback=_rates, help="Rates for the trade-off curve, e.g. 0.001,0.002,0.004."
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan; load and write nothing.")
def recover_command(aligned, finetuned, out, eval_harmful, dry_run, **options) -> None:
    """Restore a fine-tuned model's safety by resetting a few weights to aligned values."""
    if out is None and not dry_run:
        raise click.UsageError("--out is required (or use --dry-run)")
    try:
        result = recover(
            aligned, finetuned, out, eval_harmful=eval_harmful, dry_run=dry_run, **options
        )
    except (CheckpointError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if dry_run:
        click.echo(result.plan.describe())
        for note in result.warnings:
            click.echo(f"warning: {note}", err=True)
        return
    click.echo(summary(result))
