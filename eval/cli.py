"""`safealign eval`: score a model (and adapter) and optionally gate on the scores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from safealign.checkpoint import CheckpointError
from safealign.checkpoint.hub import resolve_checkpoint
from safealign.command import (
    BadInput,
    command,
    deprecated,
    handles_bad_input,
    option,
    reads_checkpoints,
    shared,
    warn,
)
from safealign.eval.api import EvalInputs, evaluate
from safealign.eval.results import gate_failures
from safealign.eval.settings import GATE, EvalSettings
from safealign.eval.smoke import SMOKE_BENIGN, SMOKE_HARMFUL, is_smoke, smoke_warning
from safealign.settings import click_options, from_cli

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
OUT_FOLDER = click.Path(file_okay=False, path_type=Path)
INPUTS = "Inputs"

EXAMPLES = (
    "safealign eval --model meta-llama/Llama-3.2-1B-Instruct \\\n"
    "    --harmful h.jsonl --task t.jsonl --benign b.jsonl --out runs/eval",
    "safealign eval --model recovered/ --harmful h.jsonl --max-harmful-rate 0.05 --json",
    "safealign eval --model recovered/ --harmful h.jsonl --json \\\n"
    "    | jq '.safe_and_coherent_rate.value, .incoherent_rate.harmful.value'",
    "safealign eval --model recovered/ --benign b.jsonl --drift-reference finetuned/ --json \\\n"
    "    | jq '.drift'",
    "safealign eval --model recovered/ --harmful h.jsonl --durability 200 \\\n"
    "    --durability-data task_train.jsonl --json | jq '.harmful_rate_after_finetune'",
)


def _sets(harmful: Path | None, benign: Path | None) -> tuple[Path, Path]:
    """The prompt sets, the bundled smoke sets where none was given (said on stderr)."""
    if harmful is None:
        warn(smoke_warning("--harmful", SMOKE_HARMFUL))
    if benign is None:
        warn(smoke_warning("--benign", SMOKE_BENIGN))
    return harmful or SMOKE_HARMFUL, benign or SMOKE_BENIGN


def _check_gate(settings: EvalSettings, harmful: Path, benign: Path, task, allow: bool) -> None:
    """A gate bound on a smoke set, or on utility without task data, is refused."""
    if settings.min_utility is not None and task is None:
        raise click.UsageError("--min-utility needs --task")
    gated = (
        ("--max-harmful-rate", settings.max_harmful_rate, "--harmful", harmful),
        ("--max-over-refusal", settings.max_over_refusal, "--benign", benign),
    )
    for gate, bound, flag, path in gated:
        if bound is not None and is_smoke(path) and not allow:
            raise BadInput(
                f"{gate} gates on the bundled smoke set {path.name}: pass {flag} FILE "
                "(or --allow-smoke to gate on it anyway)"
            )


@command(
    "eval",
    examples=EXAMPLES,
    short_help="Score harm, coherence, utility, over-refusal; gate a release.",
)
@option("--model", "model_path", required=True, group=INPUTS, help="Model folder or hub id.")
@option("--adapter", help="PEFT LoRA adapter (folder or hub id) on --model.")
@option("--harmful", type=FILE, show_default="bundled smoke set", help="Harmful prompts.")
@option("--task", type=FILE, help="Task set (prompt + answer) for utility.")
@option("--benign", type=FILE, show_default="bundled smoke set", help="Benign prompts.")
@option(
    "--drift-reference",
    help="Model (folder or hub id) that drift on the benign prompts is measured from: "
    "your fine-tuned model B.",
)
@option("--drift-reference-adapter", help="PEFT LoRA adapter on --drift-reference.")
@option(
    "--durability-data",
    type=FILE,
    help="Benign task data (prompt and reply pairs) that --durability fine-tunes on.",
)
@click_options(EvalSettings)
@option(
    "--allow-smoke", is_flag=True, group=GATE, help="Let a gate bound run on a bundled smoke set."
)
@shared("--out", type=OUT_FOLDER, detail="Writes results.json and samples.jsonl.")
@deprecated("--output", "--out", "out", type=OUT_FOLDER)
@shared("--json", name="as_json")
@shared("--quiet")
@reads_checkpoints
@handles_bad_input
def eval_command(
    model_path: str,
    adapter: str | None,
    harmful: Path | None,
    task: Path | None,
    benign: Path | None,
    drift_reference: str | None,
    drift_reference_adapter: str | None,
    durability_data: Path | None,
    allow_smoke: bool,
    out: Path | None,
    as_json: bool,
    quiet: bool,
    **values,
) -> None:
    """Score harmful rate, utility, over-refusal and coherence (exit 1 when a gate fails).

    Greedy, batched generation; refusals judged by --judge, utility by --metric. Every reply
    is first labelled incoherent or not (empty, looping, no words of the prompt's language):
    incoherent_rate per set, and safe_and_coherent_rate, the share of harmful prompts whose
    reply is coherent and a refusal (harmful_rate counts what the judge says, as before).
    With --drift-reference B, drift: the mean KL(B || model) of the next-token distributions
    over the first --drift-tokens positions of B's greedy replies to the benign prompts, in
    nats (0: the model predicts B's replies as B does), a utility score that needs no labels.
    With --durability STEPS, harmful_rate_after_finetune: the harmful rate after STEPS LoRA
    steps of retrain's sft on --durability-data (the model as the base; its folder untouched).
    Without --harmful/--benign the bundled smoke sets are used (a warning says so).
    """
    settings, _ = from_cli(EvalSettings, values)
    harmful, benign = _sets(harmful, benign)
    _check_gate(settings, harmful, benign, task, allow_smoke)
    if drift_reference_adapter is not None and drift_reference is None:
        raise click.UsageError("--drift-reference-adapter needs --drift-reference")
    if settings.durability is not None and durability_data is None:
        raise click.UsageError("--durability needs --durability-data (benign task data)")
    if durability_data is not None and settings.durability is None:
        raise click.UsageError("--durability-data needs --durability STEPS")
    checkpoints = (
        ("--model", model_path),
        ("--adapter", adapter),
        ("--drift-reference", drift_reference),
        ("--drift-reference-adapter", drift_reference_adapter),
    )
    for hint, ref in checkpoints:
        if ref is not None:
            try:
                folder = resolve_checkpoint(ref)  # a folder or a hub id, fetched before work
            except CheckpointError as error:
                raise click.BadParameter(str(error), param_hint=hint) from None
            if hint in ("--model", "--drift-reference") and not (folder / "config.json").is_file():
                raise click.BadParameter(f"{ref}: no config.json", param_hint=hint)
    inputs = EvalInputs(
        model_path,
        adapter,
        harmful,
        task,
        benign,
        drift_reference,
        drift_reference_adapter,
        durability_data,
    )
    scores = evaluate(inputs, settings, out, None if quiet else _say)
    _print(scores, out, as_json)
    failures = gate_failures(scores, settings)
    for failure in failures:
        click.echo(f"gate failed: {failure}", err=True)
    if failures:
        sys.exit(1)


def _say(line: str) -> None:
    click.echo(f"eval: {line}", err=True)


def _print(scores, out: Path | None, as_json: bool) -> None:
    """results.json on stdout with --json, else the summary (paths written on stderr)."""
    if as_json:
        click.echo(json.dumps(scores.to_dict(), indent=2))
        return
    click.echo(scores.summary())
    if out is not None:
        click.echo(f"wrote {out / 'results.json'} and {out / 'samples.jsonl'}", err=True)
