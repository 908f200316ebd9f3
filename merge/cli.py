"""``safealign merge``: parse, call :func:`safealign.merge.run_merge`, print.

The options are generated from :class:`MergeSettings` and, for the shortcut's models, from the
roles the methods declare (``--aligned`` and one flag per role).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from safealign.command import handles_bad_input
from safealign.merge.config import MergeConfig, load_config
from safealign.merge.engine import MergeResult, return_freed_tensors_to_os, run_merge
from safealign.merge.methods import ALIGNED, ROLES
from safealign.merge.report import REPORT_NAME, layer_table
from safealign.merge.settings import MergeSettings
from safealign.merge.shortcuts import safety_config
from safealign.settings import click_options, from_cli

SHORTCUT_ROLES = (ALIGNED, *ROLES.values())


def _role_options(command: Callable) -> Callable:
    """``--aligned`` and one flag per role (``harmful_model`` would be ``--harmful-model``)."""
    for role in reversed(SHORTCUT_ROLES):
        flag = "--" + role.name.replace("_", "-")
        help_text = f"Shortcut: {role.help}."
        option = click.option(flag, role.name, type=click.Path(path_type=Path), help=help_text)
        command = option(command)
    return command


def _parse_sets(values: tuple[str, ...]) -> dict:
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            params[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise click.BadParameter(f"{raw!r} is not a YAML value", param_hint="--set") from None
    return params


def _config(
    path: Path | None, settings: MergeSettings, roles: dict[str, Any], sets: tuple[str, ...]
) -> MergeConfig:
    """The config file, or the config the ``--method`` shortcut describes."""
    given = {role: value for role, value in roles.items() if value is not None}
    if path is not None:
        if settings.method or given or sets or settings.dtype:
            raise click.UsageError("give a CONFIG file or the --method shortcut, not both")
        return load_config(path)
    if not (settings.method and given.get(ALIGNED.name) and given.get("finetuned")):
        raise click.UsageError("give a CONFIG file, or --method, --aligned and --finetuned")
    return safety_config(
        settings.method, **given, parameters=_parse_sets(sets), dtype=settings.dtype
    )


def _print(result: MergeResult) -> None:
    report = result.report
    if report["layers"]:
        click.echo(layer_table(report))
        click.echo(f"{report['layers_selected']}/{report['layers_scored']} layers selected")
    if result.out is None:
        click.echo(f"needs: {report['needs']}")
        click.echo(f"{report['method']}: validated, nothing written ({report['seconds']} s)")
    else:
        click.echo(
            f"{report['method']}: wrote {report['output']} to {result.out} "
            f"({report['seconds']} s; report {REPORT_NAME})"
        )


@click.command("merge")
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@_role_options
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Shortcut: method parameter."
)
@click_options(MergeSettings)
@click.option("--score", is_flag=True, help="Print the layer table only.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handles_bad_input
def merge_command(config, out, sets, score, quiet, **values):
    """Merge checkpoints from a mergekit-style CONFIG.yaml, or a safety method by shortcut.

    \b
    safealign merge merge.yaml --out merged/
    safealign merge --method safemerge --aligned A --unaligned U --finetuned B --out C
    safealign merge --method safe_lora:select=lowest,k=8 --aligned A --unaligned U \\
        --finetuned B --score
    """
    settings, roles = from_cli(MergeSettings, values)
    cfg = _config(config, settings, roles, sets)
    settings = settings.replace(method=None, dtype=None, dry_run=settings.dry_run or score)
    if not settings.dry_run and out is None:
        raise click.UsageError("--out is required (or use --dry-run / --score)")
    # Process-wide and permanent, so the CLI (a process that only merges) opts in and the
    # API does not: see return_freed_tensors_to_os.
    return_freed_tensors_to_os()
    result = run_merge(cfg, out, settings, progress=not quiet)
    _print(result)
