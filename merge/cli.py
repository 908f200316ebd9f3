"""``safealign merge``: parse, call :func:`safealign.merge.run_merge`, print.

The options are generated from :class:`MergeSettings` and, for the shortcut's models, from the
roles the methods declare (``--aligned`` and one flag per role).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from safealign.command import (
    command,
    deprecated,
    handles_bad_input,
    option,
    reads_checkpoints,
    shared,
)
from safealign.merge.config import MergeConfig, load_config
from safealign.merge.engine import MergeResult, return_freed_tensors_to_os, run_merge
from safealign.merge.methods import ALIGNED, ROLES
from safealign.merge.report import REPORT_NAME, layer_table, summary
from safealign.merge.settings import MergeSettings
from safealign.merge.shortcuts import SHORTCUT_METHODS, flag, role_problem, safety_config
from safealign.model import resolve_dtype
from safealign.registry import split_spec
from safealign.settings import SettingsError, click_options, from_cli

SHORTCUT_ROLES = (ALIGNED, *ROLES.values())
FOLDER = click.Path(file_okay=False, path_type=Path)

EXAMPLES = (
    "safealign merge merge.yaml merged/            # as mergekit-yaml takes it",
    "safealign merge --method safe_lora:tau=0.5 --aligned meta-llama/Llama-3.2-1B-Instruct \\\n"
    "    --unaligned meta-llama/Llama-3.2-1B --finetuned my-lora/ --out safe-lora/",
    "safealign merge --method safemerge --aligned A --unaligned U --finetuned B --dry-run",
)


def _role_options(command: Callable) -> Callable:
    """``--aligned`` and one flag per role (``harmful_model`` would be ``--harmful-model``)."""
    for role in reversed(SHORTCUT_ROLES):
        help_text = f"{role.help[:1].upper()}{role.help[1:]}: folder or hub id."
        group = "Shortcut: a safety method by role" if role is ALIGNED else None
        decorate = option(flag(role.name), role.name, group=group, help=help_text)
        command = decorate(command)
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


def _check_method(method: str | None) -> None:
    """``--method`` names a shortcut method (its options are checked with the config)."""
    if method is not None and split_spec(method)[0] not in SHORTCUT_METHODS:
        raise SettingsError(
            f"--method must be one of {', '.join(SHORTCUT_METHODS)}, got {split_spec(method)[0]!r}"
        )


def _config(
    path: Path | None,
    method: str | None,
    dtype: str | None,
    roles: dict[str, Any],
    sets: tuple[str, ...],
) -> MergeConfig:
    """The config file (its dtype overridden by --dtype), or the ``--method`` shortcut's."""
    given = {role: value for role, value in roles.items() if value is not None}
    if path is not None:
        if method or given or sets:
            raise click.UsageError("give a CONFIG file or the --method shortcut, not both")
        config = load_config(path)
        if dtype:
            resolve_dtype(dtype)
            config = dataclasses.replace(config, dtype=dtype, out_dtype=None)
        return config
    if not method:
        raise click.UsageError("give a CONFIG file, or --method with its models")
    problem = role_problem(split_spec(method)[0], given)
    if problem:
        raise click.UsageError(problem)
    return safety_config(method, **given, parameters=_parse_sets(sets), dtype=dtype)


def _say(line: str) -> None:
    click.echo(f"merge: {line}", err=True)


def _print(result: MergeResult, as_json: bool) -> None:
    """A dry run shows its layer table; a merge a one-screen summary (the table is in the
    report); --json prints the report."""
    report = result.report
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if result.out is None:
        if report["layers"]:
            click.echo(layer_table(report))
        click.echo(summary(report))
        click.echo(f"needs: {report['needs']}")
        click.echo(f"{report['method']}: validated, nothing written ({report['seconds']} s)")
        return
    click.echo(summary(report))
    click.echo(
        f"{report['method']}: wrote {report['output']} to {result.out} "
        f"({report['seconds']} s; per-layer table in {REPORT_NAME})"
    )


@command(
    "merge",
    examples=EXAMPLES,
    short_help="Merge checkpoints: mergekit CONFIG, or a safety method by role.",
)
@click.argument("config", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_folder", metavar="[OUT]", required=False, type=FOLDER)
@option(
    "--method",
    group="Merge",
    help=f"Shortcut: a safety method ({', '.join(SHORTCUT_METHODS)}), "
    "as NAME or NAME:key=value,...",
)
@click_options(MergeSettings, group="Merge")
@_role_options
@shared("--out", "Also the second argument, as mergekit-yaml takes it.", type=FOLDER)
@shared("--dtype", "Output dtype (overrides a CONFIG's).", show_default="the inputs'")
@shared("--json", "Prints merge_report.json.", name="as_json")
@shared("--quiet")
@deprecated("--set", "--method NAME:key=value,...", "sets", multiple=True, metavar="KEY=VALUE")
@deprecated("--score", "--dry-run", "dry_run", is_flag=True)
@deprecated(
    "--output", "--output-type", "output_type", type=click.Choice(["auto", "model", "adapter"])
)
@reads_checkpoints
@handles_bad_input
def merge_command(config, out_folder, method, out, dtype, as_json, quiet, sets=(), **values):
    """Merge checkpoints: a mergekit-style CONFIG, or a safety method by role.

    CONFIG is mergekit's YAML (linear, task_arithmetic, ties, dare_*, slerp, and the safety
    methods with a role per model), OUT the output folder (or --out); the shortcut builds a
    config from --method and the role flags. A dry run prints the per-layer table; a merge
    prints a summary and writes the table to merge_report.json.
    """
    if out_folder is not None and out is not None and out_folder != out:
        raise click.UsageError(f"two output folders: {out_folder} and --out {out}")
    out = out or out_folder
    _check_method(method)
    settings, roles = from_cli(MergeSettings, values)
    cfg = _config(config, method, dtype, roles, sets)
    if not settings.dry_run and out is None:
        raise click.UsageError("--out is required (or use --dry-run)")
    # Process-wide and permanent, so the CLI (a process that only merges) opts in and the
    # API does not: see return_freed_tensors_to_os.
    return_freed_tensors_to_os()
    result = run_merge(cfg, settings, out, None if quiet else _say)
    _print(result, as_json)
