"""The ``safealign`` command: a thin click layer over the Python API of each capability."""

from __future__ import annotations

from pathlib import Path

import click

from safealign import __version__
from safealign.command import Command, OneLineGroup, handles_bad_input, option, shared
from safealign.compare.cli import compare_command
from safealign.demo import run_demo
from safealign.eval.cli import eval_command
from safealign.lab.cli import lab_command
from safealign.merge.cli import merge_command
from safealign.recover.cli import recover_command
from safealign.recover.lock_cli import safetylock_command
from safealign.retrain.cli import retrain_command


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safealign")
def main() -> None:
    """Keep fine-tuned LLMs safe: recover refusals, merge safely, evaluate the trade-off."""


DEMO_EXAMPLES = (
    "safealign demo --out /tmp/demo",
    "safealign demo --size default --out runs/demo-default --quiet",
)


@main.command(
    "demo",
    cls=Command,
    examples=DEMO_EXAMPLES,
    short_help="Build the lab and compare every method on it.",
)
@shared("--out", "Holds report.md, report.json, tradeoff.png.", default="runs/demo")
@option(
    "--size",
    type=click.Choice(["test", "default"]),
    default="test",
    group="Lab",
    help="test: the tests' and the demo's lab (4 layers); default: the benchmarks' (6 layers).",
)
@shared("--seed", type=click.IntRange(min=0), default=0)
@shared("--quiet")
@handles_bad_input
def demo_command(out: str, size: str, seed: int, quiet: bool) -> None:
    """Build the lab and compare every method on its harmful fine-tune (report in --out)."""
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    result = run_demo(out, size=size, seed=seed, log=log)
    click.echo((Path(result.out) / "report.md").read_text())


main.add_command(lab_command)
main.add_command(eval_command)
main.add_command(recover_command)
main.add_command(safetylock_command)
main.add_command(merge_command)
main.add_command(retrain_command)
main.add_command(compare_command)
