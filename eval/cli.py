"""`safealign eval`: score a model folder (or adapter) and optionally gate on the scores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from safealign.command import handles_bad_input
from safealign.eval.evaluator import Evaluator
from safealign.eval.results import gate_failures, write_results
from safealign.eval.settings import EvalSettings
from safealign.eval.smoke import SMOKE_BENIGN, SMOKE_HARMFUL
from safealign.model import resolve_dtype
from safealign.settings import SettingsError, click_options, from_cli

FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
OUT_FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command("eval")
@click.option("--model", "model_path", type=FOLDER, required=True, help="Model folder.")
@click.option("--adapter", type=FOLDER, help="PEFT LoRA adapter folder on --model.")
@click.option("--harmful", type=FILE, default=SMOKE_HARMFUL, show_default="bundled smoke set")
@click.option("--task", type=FILE, help="Task set (prompt + answer) for utility.")
@click.option("--benign", type=FILE, default=SMOKE_BENIGN, show_default="bundled smoke set")
@click_options(EvalSettings)
@click.option("--output", type=OUT_FOLDER, help="Write results.json and samples.jsonl here.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
@click.option("--device", help="torch device, e.g. cpu or cuda (default: cpu).")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16, ...")
@handles_bad_input
def eval_command(
    model_path: Path,
    adapter: Path | None,
    harmful: Path,
    task: Path | None,
    benign: Path,
    output: Path | None,
    as_json: bool,
    device: str | None,
    dtype: str,
    **values,
) -> None:
    """Harmful rate, utility and over-refusal of a model; exit 1 when a gate bound is broken."""
    try:
        settings, _ = from_cli(EvalSettings, values)
    except SettingsError as error:
        raise click.UsageError(str(error)) from None
    if settings.min_utility is not None and task is None:
        raise click.UsageError("--min-utility needs --task")
    if not (model_path / "config.json").is_file():
        raise click.BadParameter(f"{model_path}: no config.json", param_hint="--model")
    try:
        resolve_dtype(dtype)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--dtype") from None
    try:
        evaluator = Evaluator(harmful, task, benign, settings=settings)
    except (ValueError, TypeError, OSError) as error:
        raise click.UsageError(str(error)) from None
    scores = evaluator.score_folder(model_path, adapter=adapter, dtype=dtype, device=device)
    if output is not None:
        write_results(scores, output)
    if as_json:
        click.echo(json.dumps(scores.to_dict(), indent=2))
    else:
        click.echo(scores.summary())
        if output is not None:
            click.echo(f"wrote {output / 'results.json'} and {output / 'samples.jsonl'}")
    failures = gate_failures(scores, settings)
    for failure in failures:
        click.echo(f"gate failed: {failure}", err=True)
    if failures:
        sys.exit(1)
