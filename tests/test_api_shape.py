"""One shape for every capability: ``capability(inputs, settings, out, progress)``, and every
setting named as its flag, in the API, the CLI and the README's Design table alike."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import click
import pytest

from safealign.compare import CompareInputs, CompareSettings, compare
from safealign.compare.cli import compare_command
from safealign.eval import EvalInputs, EvalSettings, evaluate
from safealign.eval.cli import eval_command
from safealign.merge import MergeConfig, MergeSettings, run_merge
from safealign.merge.cli import merge_command
from safealign.progress import ProgressCallback
from safealign.recover import RecoverInputs, RecoverSettings, recover
from safealign.recover.cli import recover_command
from safealign.recover.lock_cli import safetylock_command
from safealign.recover.safetylock import SafetyLockInputs, SafetyLockSettings, safetylock
from safealign.retrain import RetrainInputs, RetrainSettings, retrain
from safealign.retrain.cli import retrain_command
from safealign.settings import Settings, flag_name

README = Path(__file__).resolve().parents[1] / "README.md"

#: Each capability's entry point, its inputs type, its settings type and its command.
CAPABILITIES = {
    "eval": (evaluate, EvalInputs, EvalSettings, eval_command),
    "recover": (recover, RecoverInputs, RecoverSettings, recover_command),
    "safetylock": (safetylock, SafetyLockInputs, SafetyLockSettings, safetylock_command),
    "merge": (run_merge, MergeConfig, MergeSettings, merge_command),
    "retrain": (retrain, RetrainInputs, RetrainSettings, retrain_command),
    "compare": (compare, CompareInputs, CompareSettings, compare_command),
}
POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _types(hint) -> set:
    """The types a hint allows (``X | None`` is ``{X, NoneType}``)."""
    return set(typing.get_args(hint)) or {hint}


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_every_entry_point_takes_inputs_settings_out_progress(name):
    function, inputs, settings, _ = CAPABILITIES[name]
    parameters = list(inspect.signature(function).parameters.values())
    assert [p.kind for p in parameters] == [POSITIONAL] * 4, name
    assert [p.name for p in parameters[1:]] == ["settings", "out", "progress"], name
    assert [p.default for p in parameters[1:]] == [None, None, None], name
    hints = typing.get_type_hints(function)
    first = parameters[0].name
    assert inputs in _types(hints[first]) and dataclasses.is_dataclass(inputs)
    assert _types(hints["settings"]) == {settings, type(None)}
    assert issubclass(settings, Settings)
    assert Path in _types(hints["out"]) and type(None) in _types(hints["out"])
    assert hints["progress"] == ProgressCallback


@pytest.mark.parametrize("name", sorted(set(CAPABILITIES) - {"merge"}))
def test_inputs_are_frozen_and_hold_no_setting(name):
    _, inputs, settings, _ = CAPABILITIES[name]
    assert inputs.__dataclass_params__.frozen
    read = {f.name for f in dataclasses.fields(inputs)}
    assert read & {f.name for f in dataclasses.fields(settings)} == set()


def _options(command: click.Command) -> dict[str, click.Option]:
    ctx = click.Context(command)
    return {p.name: p for p in command.get_params(ctx) if isinstance(p, click.Option)}


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_every_setting_is_named_as_its_flag(name):
    """``grad_batch_size`` is ``--grad-batch-size`` in the settings, the generated option and
    the command: one name in the API, YAML, specs and the CLI."""
    _, _, settings, command = CAPABILITIES[name]
    options = _options(command)
    for field in dataclasses.fields(settings):
        flag = "--" + field.name.replace("_", "-")
        assert flag_name(field) == flag
        if field.metadata.get("cli", True):
            assert flag in options[field.name].opts, (name, field.name, options[field.name].opts)


def test_batch_size_is_the_generation_batch_wherever_it_is_a_setting():
    """``batch_size`` is the generation (scoring) batch; a gradient batch is
    ``grad_batch_size``."""
    having = {
        name
        for name, (_, _, settings, _) in CAPABILITIES.items()
        if "batch_size" in {f.name for f in dataclasses.fields(settings)}
    }
    assert having == {"eval", "recover", "safetylock", "compare"}
    gradient = {
        name
        for name, (_, _, settings, _) in CAPABILITIES.items()
        if "grad_batch_size" in {f.name for f in dataclasses.fields(settings)}
    }
    assert gradient == {"recover", "retrain"}


def test_the_readme_design_table_lists_every_entry_point_as_it_is():
    design = README.read_text().split("\n## Design\n", 1)[1].split("\n## ", 1)[0]
    rows = {
        cells[0]: cells[1:]
        for line in design.splitlines()
        if line.startswith("| `")
        for cells in [re.findall(r"`([^`]*)`", line)]
    }
    for name, (function, inputs, settings, _) in CAPABILITIES.items():
        first = next(iter(inspect.signature(function).parameters))
        call = f"{function.__name__}({first}, settings, out, progress)"
        assert rows[name][:3] == [call, inputs.__name__, settings.__name__], name
