"""``safealign retrain``: options generated from :class:`RetrainSettings`, YAML with --config."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from safealign.command import handles_bad_input
from safealign.retrain.api import retrain
from safealign.retrain.settings import RetrainSettings
from safealign.settings import SettingsError, click_options, from_cli


def load_config(path: str | None) -> dict | None:
    """The YAML mapping in ``path`` (None without a path)."""
    if path is None:
        return None
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: a retrain config is a mapping of settings")
    data = {str(key).replace("-", "_"): value for key, value in data.items()}
    RetrainSettings.from_dict(data, where=str(path))
    return data


@click.command("retrain")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file of settings (keys as the flags, with _ or -); typed flags override it.",
)
@click_options(RetrainSettings)
@handles_bad_input
def retrain_command(config: str | None, **values) -> None:
    """Fine-tune an aligned model on your data with a regularizer that keeps it aligned.

    LoRA on --aligned by default (the reference is the model with its adapter switched off);
    --full trains every weight. Several GPUs: `accelerate launch --config_file
    examples/accelerate_ddp.yaml "$(which safealign)" retrain ...`.
    """
    base = load_config(config)
    settings, _ = from_cli(RetrainSettings, values, base)
    result = retrain(settings, log=click.echo)
    if result.out is not None:
        loss = result.metrics.get("final_loss")
        click.echo(f"steps {result.plan['steps']}, final loss {loss:.4f}: {result.out}")
