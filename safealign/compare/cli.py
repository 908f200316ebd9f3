"""``safealign compare``: parse, call :func:`safealign.compare.compare`, print the table."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import click

from safealign.command import command, handles_bad_input, option, reads_checkpoints, shared
from safealign.compare.run import compare
from safealign.compare.settings import CompareInputs, CompareSettings
from safealign.settings import SettingsError, click_options, from_cli, read_config

_INPUTS = [f.name for f in fields(CompareInputs)]

#: Help of each input of :class:`CompareInputs` (an input without help here gets none).
INPUT_HELP = {
    "aligned": "Aligned model A: folder or hub id (required here or in --config).",
    "finetuned": "Fine-tuned model or LoRA adapter on A (B).",
    "unaligned": "Model before alignment (safe_lora, safemerge).",
    "safety": "Safety LoRA adapter on A (safemerge).",
    "harmful_model": "A fine-tuned on harmful data (resta).",
    "train_data": "B's fine-tuning data (retrain methods).",
    "harmful": "Harmful prompts every model is scored on.",
    "task": "Task examples with answers (utility).",
    "benign": "Benign prompts (over-refusal).",
    "harmful_train": "Harmful prompts methods learn from.",
    "task_train": "Task data methods check utility on.",
    "benign_train": "Benign prompts methods learn from (retrain's critic and anchors, "
    "safetylock; recover's guard without --guard).",
    "guard": "Benign prompts recover's over-refusal guard steers and checks on.",
    "durability_data": "Benign task data (prompt, reply) --durability fine-tunes on.",
}

EXAMPLES = (
    "safealign compare --aligned A --finetuned B --unaligned U --harmful h.jsonl \\\n"
    "    --task t.jsonl --benign b.jsonl --out runs/cmp",
    "safealign compare --config compare.yaml --methods recover,safe_lora:tau=0.35 --out runs/c",
    "safealign compare --aligned A --finetuned B --harmful h.jsonl --benign b.jsonl \\\n"
    "    --utility drift --out runs/no-task",
    "safealign compare --config compare.yaml --durability 200 --durability-data t.jsonl \\\n"
    "    --harm durable --out runs/durable",
)


def _input_options(command: Callable) -> Callable:
    """One option per field of :class:`CompareInputs`, in its order."""
    for index, name in reversed(list(enumerate(_INPUTS))):
        group = "Inputs" if index == 0 else None
        flag = "--" + name.replace("_", "-")
        command = option(flag, type=click.Path(), group=group, help=INPUT_HELP.get(name))(command)
    return command


def _load_config(path: str | None) -> tuple[dict, dict]:
    """A YAML config's inputs and settings (flags the user types override both)."""
    if path is None:
        return {}, {}
    data = read_config(path)
    inputs = {k: v for k, v in data.items() if k in _INPUTS}
    settings = {k: v for k, v in data.items() if k not in _INPUTS}
    CompareSettings.from_dict(settings, where=str(path))  # unknown keys, naming the file
    return inputs, settings


@command(
    "compare",
    examples=EXAMPLES,
    short_help="Run every method side by side on your models; one report.",
)
@_input_options
@option("--config", type=click.Path(dir_okay=False), help="YAML with any of these options.")
@click_options(CompareSettings)
@shared(
    "--out",
    "Holds report.md, report.json, tradeoff.png.",
    type=click.Path(file_okay=False),
    required=True,
)
@shared("--json", "Prints report.json.", name="as_json")
@shared("--quiet")
@reads_checkpoints
@handles_bad_input
def compare_command(config, out, as_json, quiet, **values) -> None:
    """Run recover, the safety merges and retrain side by side on your models.

    Every method's output is scored by one evaluator with the same settings (harmful rate,
    safe-and-coherent rate, utility, over-refusal, incoherent rates); the report holds one
    table, a trade-off plot and one recommendation.
    """
    base_inputs, base_settings = _load_config(config)
    settings, rest = from_cli(CompareSettings, values, base_settings)
    given = {k: v for k, v in rest.items() if v is not None}
    inputs = {**base_inputs, **given}
    for name in ("aligned", "finetuned"):
        if not inputs.get(name):
            raise SettingsError(f"--{name} is required (here or in --config)")
    result = compare(CompareInputs(**inputs), settings, out, None if quiet else _log)
    report = "report.json" if as_json else "report.md"
    text = (Path(result.out) / report).read_text()
    click.echo(json.dumps(json.loads(text), indent=2) if as_json else text)


def _log(line: str) -> None:
    click.echo(line, err=True)
