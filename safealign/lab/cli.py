"""`safealign lab build`: build the embedded lab (or find it cached) and print its table."""

from __future__ import annotations

from pathlib import Path

import click

from safealign.command import handles_bad_input
from safealign.lab.build import build
from safealign.lab.config import SIZES
from safealign.lab.phenomenon import format_table


@click.group("lab")
def lab_command() -> None:
    """The embedded lab: tiny synthetic chat models to run every command on."""


@lab_command.command("build")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to hold the lab (default: the cache, $SAFEALIGN_CACHE or ~/.cache/safealign).",
)
@click.option("--size", type=click.Choice(list(SIZES)), default="default", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--harmful-share",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of compliant harmful examples in ft_harmful's training mix.",
)
@click.option("--force", is_flag=True, help="Rebuild even when a cached build exists.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@handles_bad_input
def build_command(
    out: Path | None, size: str, seed: int, harmful_share: float | None, force: bool, quiet: bool
) -> None:
    """Build the lab: data, tokenizer, models, fine-tunes; print the phenomenon table.

    Exits with status 1 when a required property of the phenomenon does not hold.
    """
    log = None if quiet else (lambda line: click.echo(line, err=True))
    lab = build(out, size=size, seed=seed, force=force, harmful_share=harmful_share, log=log)
    info = lab.info
    click.echo(format_table(info["table"], info["checks"]))
    built = f"{info['size']}, seed {info['seed']}, built in {info['build_seconds']:.0f}s"
    click.echo(f"lab ({built}): {lab.root}")
    if not info["phenomenon"]:
        raise SystemExit(1)
