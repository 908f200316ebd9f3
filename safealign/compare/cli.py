"""``safealign compare``: parse, call :func:`safealign.compare.compare`, print the table."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click
import yaml

from safealign.command import handles_bad_input
from safealign.compare.run import compare
from safealign.compare.settings import CompareInputs, CompareSettings
from safealign.settings import SettingsError, click_options, from_cli

_INPUTS = [f.name for f in fields(CompareInputs)]


def _load_config(path: str | None) -> tuple[dict, dict]:
    """A YAML config's inputs and settings (flags the user types override both)."""
    if path is None:
        return {}, {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of options")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    inputs = {k: v for k, v in data.items() if k in _INPUTS}
    settings = {k: v for k, v in data.items() if k not in _INPUTS}
    CompareSettings.from_dict(settings, where=str(path))  # unknown keys, naming the file
    return inputs, settings


@click.command("compare")
@click.option(
    "--aligned", type=click.Path(), help="Aligned model A (required here or in --config)."
)
@click.option("--finetuned", type=click.Path(), help="Fine-tuned model or LoRA adapter on A (B).")
@click.option("--unaligned", type=click.Path(), help="Model before alignment (safe_lora, ...).")
@click.option("--safety", type=click.Path(), help="Safety LoRA adapter on A (safemerge).")
@click.option("--train-data", type=click.Path(), help="B's fine-tuning data (retrain methods).")
@click.option("--harmful", type=click.Path(), help="Harmful prompts every model is scored on.")
@click.option("--task", type=click.Path(), help="Task examples with answers (utility).")
@click.option("--benign", type=click.Path(), help="Benign prompts (over-refusal).")
@click.option("--harmful-train", type=click.Path(), help="Harmful prompts methods learn from.")
@click.option("--task-train", type=click.Path(), help="Task data methods check utility on.")
@click.option("--benign-train", type=click.Path(), help="Benign prompts recover's guard checks.")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with any of these options.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder.")
@click_options(CompareSettings)
@handles_bad_input
def compare_command(config, out, **values) -> None:
    """Run recover, the safety merges and retrain side by side on your models.

    \b
    Examples:
      safealign compare --aligned A --finetuned B --unaligned U --harmful h.jsonl \\
          --task t.jsonl --benign b.jsonl --out runs/cmp
      safealign compare --config compare.yaml --methods recover,safe_lora:tau=0.35 --out runs/c
    """
    base_inputs, base_settings = _load_config(config)
    settings, rest = from_cli(CompareSettings, values, base_settings)
    given = {k: v for k, v in rest.items() if v is not None}
    inputs = {**base_inputs, **given}
    for name in ("aligned", "finetuned"):
        if not inputs.get(name):
            raise SettingsError(f"--{name} is required (here or in --config)")
    result = compare(CompareInputs(**inputs), out, settings, log=_log)
    click.echo((Path(result.out) / "report.md").read_text())


def _log(line: str) -> None:
    click.echo(line, err=True)
