"""``safealign retrain``: options generated from :class:`RetrainSettings`, YAML with --config."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from safealign.command import (
    command,
    deprecated,
    handles_bad_input,
    option,
    reads_checkpoints,
    shared,
    warn,
)
from safealign.eval.smoke import SMOKE_BENIGN, SMOKE_HARMFUL, smoke_warning
from safealign.registry import parse_value, split_spec
from safealign.retrain.api import retrain
from safealign.retrain.regularizers import OLD_NAMES, help_rows, upgrade
from safealign.retrain.settings import RetrainInputs, RetrainSettings
from safealign.settings import SettingsError, click_options, from_cli, read_config

#: Regularizers that read harmful prompts (the probe critic, der's default anchors).
SMOKE_USERS = ("adaptive-kl", "der")
#: Regularizers that read benign prompts (interleave's default anchor pool).
BENIGN_USERS = ("interleave",)

#: Help of each field of :class:`RetrainInputs`, one flag each.
INPUT_HELP = {
    "aligned": "Aligned model folder (A).",
    "data": "Training data: prompt/response or chat messages (JSONL, JSON, CSV).",
    "adapter": "Continue from this LoRA adapter on A (its frozen clone is the reference).",
    "harmful": "Harmful prompts (probe, anchors, eval) [bundled set].",
    "benign": "Benign prompts (probe, interleave's anchors, eval) [bundled].",
    "task": "Task set (prompt + answer) for --eval-every.",
}
#: Keys of a YAML config that are not settings: the inputs and the output folder.
PATH_KEYS = (*INPUT_HELP, "out")

EXAMPLES = (
    "safealign retrain --aligned meta-llama/Llama-3.2-1B-Instruct --data train.jsonl \\\n"
    "    --regularizer adaptive-kl --out my-lora/",
    "safealign retrain --config retrain.yaml --regularizer kl:weight=0.5 --dry-run",
)


def load_config(path: str | None) -> tuple[dict, dict | None, dict]:
    """The YAML config in ``path``: its inputs and output folder (``PATH_KEYS``), its
    settings (None without a path), checked for unknown keys and former names, and the
    regularizer options it gives by their former names."""
    if path is None:
        return {}, None, {}
    data = read_config(path)
    paths = {key: data.pop(key) for key in PATH_KEYS if key in data}
    data = {RetrainSettings.current_name(key, str(path)): value for key, value in data.items()}
    old = {key: data.pop(key) for key in list(data) if key in OLD_NAMES}
    RetrainSettings.from_dict(data, where=str(path))
    return paths, data, old


def _input_options(command: Callable) -> Callable:
    """One option per field of :class:`RetrainInputs`, in its order, under "Inputs"."""
    for name, help_text in reversed(INPUT_HELP.items()):
        flag = "--" + name.replace("_", "-")
        command = option(flag, type=click.Path(), group="Inputs", help=help_text)(command)
    return command


def old_flags(command: Callable) -> Callable:
    """The regularizer options' former flags (``--kl-weight``), hidden, kept for one release:
    the command gets them as ``old``, those typed by their former names."""

    @functools.wraps(command)
    def wrapper(*args: Any, **values: Any) -> Any:
        old = {name: values.pop("old_" + name) for name in OLD_NAMES}
        typed = {name: parse_value(text) for name, text in old.items() if text is not None}
        return command(*args, old=typed, **values)

    for name in OLD_NAMES:
        flag = "--" + name.replace("_", "-")
        wrapper = click.option(flag, "old_" + name, hidden=True, default=None)(wrapper)
    return wrapper


@command(
    "retrain",
    examples=EXAMPLES,
    sections={"Regularizer options (--regularizer NAME:key=value,...)": help_rows()},
    short_help="Fine-tune with a regularizer that keeps the model aligned.",
)
@option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    group="Inputs",
    help="YAML file of settings (keys as the flags, with _ or -); typed flags override it.",
)
@_input_options
@click_options(RetrainSettings, group="Inputs")
@shared("--out", "Required unless --dry-run.", type=click.Path())
@shared("--quiet")
@deprecated("--batch-size", "--grad-batch-size", "grad_batch_size", type=int)
@old_flags
@reads_checkpoints
@handles_bad_input
def retrain_command(config: str | None, out: str | None, quiet: bool, old: dict, **values) -> None:
    """Fine-tune an aligned model with a regularizer that keeps it aligned.

    LoRA on --aligned by default (the reference is the model with its adapter switched off);
    --full trains every weight. Several GPUs: `accelerate launch --config_file
    examples/accelerate_ddp.yaml "$(which safealign)" retrain ...`.
    """
    paths, base, old_keys = load_config(config)
    settings, typed = from_cli(RetrainSettings, values, base)
    config_out = paths.pop("out", None)
    out = out or config_out  # a typed flag wins over the config
    given = {**paths, **{k: v for k, v in typed.items() if v is not None}}
    for name in ("aligned", "data"):
        if not given.get(name):
            raise SettingsError(f"--{name} is required")
    inputs = RetrainInputs(**given)
    # A former flag wins over a former config key, a spec's own option over both.
    spec = upgrade(settings.regularizer, old, old_form="{flag}", new_form="--regularizer {spec}")
    spec = upgrade(spec, old_keys, old_form=f"{config}: {{name}}", new_form="regularizer: {spec}")
    settings = settings.replace(regularizer=spec)
    _warn_smoke(inputs, settings)
    # A dry run's plan is its result (stdout); a run's lines are progress (stderr).
    result = retrain(inputs, settings, out, None if quiet else _log)
    if settings.dry_run:
        click.echo(" ".join(f"{k}={v}" for k, v in result.plan.items()))
    elif result.out is not None:
        loss = result.metrics.get("final_loss")
        click.echo(f"steps {result.plan['steps']}, final loss {loss:.4f}: {result.out}")


def _warn_smoke(inputs: RetrainInputs, settings: RetrainSettings) -> None:
    """Say where a bundled smoke set stands in for prompts the user did not give."""
    regularizer, _ = split_spec(settings.regularizer)
    if inputs.harmful is None and (regularizer in SMOKE_USERS or settings.eval_every):
        warn(smoke_warning("--harmful", SMOKE_HARMFUL))
    if inputs.benign is None and (regularizer in BENIGN_USERS or settings.eval_every):
        warn(smoke_warning("--benign", SMOKE_BENIGN))


def _log(line: str) -> None:
    click.echo(f"retrain: {line}", err=True)
