"""``safealign safetylock``: parse, call :func:`safealign.recover.safetylock.safetylock`, print.

The inputs are written here; every other option is generated from
:class:`~safealign.recover.safetylock.SafetyLockSettings`.
"""

from __future__ import annotations

import json

import click

from safealign.command import command, handles_bad_input, option, reads_checkpoints, shared
from safealign.recover.cli import pair_inputs
from safealign.recover.safetylock import SafetyLockInputs, SafetyLockSettings, safetylock
from safealign.settings import click_options, from_cli

EXAMPLES = (
    "safealign safetylock --aligned meta-llama/Llama-3.2-1B-Instruct --finetuned my-lora/ \\\n"
    "    --harmful h.jsonl --out locked/",
    "safealign safetylock --aligned A --finetuned B --pairs safe_dataset.json --dry-run",
)


@command(
    "safetylock",
    examples=EXAMPLES,
    short_help="Shift a fine-tune's safety heads toward the aligned model.",
)
@pair_inputs
@option(
    "--harmful",
    type=click.Path(),
    help="Harmful prompts: A and B answer them (replies), or they face --benign (prompts).",
)
@option(
    "--pairs",
    type=click.Path(),
    help="Questions with a safe and an unsafe answer (the authors' format) for --contrast "
    "replies, instead of A's and B's replies to --harmful.",
)
@option("--benign", type=click.Path(), help="Benign prompts, for --contrast prompts.")
@click_options(SafetyLockSettings)
@shared("--out", "The locked checkpoint (required unless --dry-run).", type=click.Path())
@shared("--json", "Prints the report (heads, probe accuracies, spreads).", name="as_json")
@shared("--quiet")
@reads_checkpoints
@handles_bad_input
def safetylock_command(out: str | None, as_json: bool, quiet: bool, **values) -> None:
    """Shift B's safety heads toward A's safe side, baked into a checkpoint (SafetyLock).

    Probes on A's attention heads pick the --heads that best separate safe from unsafe
    replies; each gets its mass-mean direction times --strength spreads, written as o_proj
    biases into a copy of B (a LoRA B is merged into a full model)."""
    settings, given = from_cli(SafetyLockSettings, values)
    result = safetylock(SafetyLockInputs(**given), settings, out, None if quiet else _say)
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
        return
    heads = ", ".join(f"{h['layer']}.{h['head']}" for h in result.report["lock"]["heads"])
    click.echo(f"heads (layer.head): {heads}")
    if result.out is not None:
        click.echo(f"wrote {result.out}")


def _say(line: str) -> None:
    click.echo(f"safetylock: {line}", err=True)
