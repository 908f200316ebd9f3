"""``safealign retrain``: options generated from :class:`RetrainSettings`, YAML with --config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import yaml

from safealign.data import DataError
from safealign.registry import RegistryError
from safealign.retrain.api import retrain
from safealign.retrain.settings import RetrainSettings
from safealign.settings import SettingsError, click_options, flag_name, from_cli

#: Off-by-default switches. safealign.settings.click_options makes them options that take a
#: value under click 8.5 (``--resume`` then swallows the next argument): they are declared
#: here as flags until that is fixed there.
SWITCHES = tuple(
    f
    for f in dataclasses.fields(RetrainSettings)
    if f.default is False and f.metadata.get("cli", True)
)

#: Errors that mean "bad input": printed as one line, exit status 1, nothing trained.
INPUT_ERRORS = (SettingsError, RegistryError, DataError, FileExistsError, ValueError)


def load_config(path: str | None) -> dict | None:
    """The YAML mapping in ``path`` (None without a path)."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise click.ClickException(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: a retrain config is a mapping of settings")
    data = {str(key).replace("-", "_"): value for key, value in data.items()}
    try:
        RetrainSettings.from_dict(data, where=str(path))
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    return data


def switches(command):
    """Add :data:`SWITCHES` as click flags."""
    for field in reversed(SWITCHES):
        decorate = click.option(
            flag_name(field), field.name, is_flag=True, help=field.metadata["help"]
        )
        command = decorate(command)
    return command


@click.command("retrain")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file of settings (keys as the flags, with _ or -); typed flags override it.",
)
@click_options(RetrainSettings, exclude=[f.name for f in SWITCHES])
@switches
def retrain_command(config: str | None, **values) -> None:
    """Fine-tune an aligned model on your data with a regularizer that keeps it aligned.

    LoRA on --aligned by default (the reference is the model with its adapter switched off);
    --full trains every weight. Several GPUs: `accelerate launch --config_file
    examples/accelerate_ddp.yaml "$(which safealign)" retrain ...`.
    """
    base = load_config(config)
    try:
        settings, _ = from_cli(RetrainSettings, values, base)
        result = retrain(settings, log=click.echo)
    except INPUT_ERRORS as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    if result.out is not None:
        loss = result.metrics.get("final_loss")
        click.echo(f"steps {result.plan['steps']}, final loss {loss:.4f}: {result.out}")
