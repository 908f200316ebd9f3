"""Each regularizer owns its options: one settings class holds them and their defaults, and
``retrain --help``, the ``--regularizer`` spec, the YAML config and compare's ``retrain:``
spec are generated from it with one spelling; the former spellings still work, with a warning."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import yaml
from click.testing import CliRunner

from safealign.command import OldSpelling
from safealign.compare.methods import parse_method, retrain_options
from safealign.retrain import cli as retrain_cli
from safealign.retrain.regularizers import (
    OLD_NAMES,
    REGULARIZERS,
    Regularizer,
    RegularizerSettings,
    resolve,
    spec_text,
)
from safealign.retrain.settings import RetrainSettings

OPTIONS = [
    (name, field)
    for name in REGULARIZERS
    for field in dataclasses.fields(REGULARIZERS.get(name).settings_class)
]
#: Each former name with one regularizer that takes it: (former name, regularizer, key).
OLD = [(old, name, key) for old, owners in OLD_NAMES.items() for name, key in owners.items()]


def value_of(field: dataclasses.Field) -> str:
    """A valid value of ``field`` as a spec writes it (its default, a file for a path)."""
    return "anchors.jsonl" if field.default is None else spec_text(field.default)


def test_each_regularizer_has_its_own_settings_class_and_no_other_defaults():
    classes = [REGULARIZERS.get(name).settings_class for name in REGULARIZERS]
    assert len(set(classes)) == len(classes)
    retrain_fields = {f.name for f in dataclasses.fields(RetrainSettings)}
    for name in REGULARIZERS:
        cls = REGULARIZERS.get(name)
        assert issubclass(cls.settings_class, RegularizerSettings)
        assert cls.settings_class.regularizer == name
        # A constructor takes the settings object alone: no keyword repeats a default.
        assert list(inspect.signature(cls).parameters) == ["settings"], name
        keys = {f.name for f in dataclasses.fields(cls.settings_class)}
        assert not keys & retrain_fields, name  # compare's flat spec stays unambiguous
    assert not set(OLD_NAMES) & retrain_fields  # the former fields left RetrainSettings
    assert not hasattr(Regularizer, "options")


def help_terms() -> list[str]:
    result = CliRunner().invoke(retrain_cli.retrain_command, ["--help"], terminal_width=200)
    section = result.output.split("\nRegularizer options (", 1)[1].split("\nExamples:", 1)[0]
    return re.findall(r"^  (\S+)", section, re.M)  # the terms; wrapped help is indented more


def test_help_shows_every_option_once_and_only_the_options():
    assert help_terms() == [f"{name}:{field.name}" for name, field in OPTIONS]


def test_every_former_flag_names_an_option_and_is_hidden():
    params = {p.name: p for p in retrain_cli.retrain_command.params}
    for old, owners in OLD_NAMES.items():
        param = params["old_" + old]
        assert param.hidden and param.opts == ["--" + old.replace("_", "-")]
        for name, key in owners.items():
            fields = dataclasses.fields(REGULARIZERS.get(name).settings_class)
            assert any(f.name == key and f.metadata["old_name"] == old for f in fields)
    named = {f.metadata["old_name"] for _, f in OPTIONS if f.metadata["old_name"]}
    assert named == set(OLD_NAMES)


@pytest.mark.parametrize("name, field", OPTIONS, ids=lambda o: getattr(o, "name", o))
def test_the_spec_the_config_and_compare_accept_the_same_names(name, field, tmp_path):
    spec = f"{name}:{field.name}={value_of(field)}"
    settings = resolve(spec)
    config = tmp_path / "retrain.yaml"
    config.write_text(f"regularizer: '{spec}'\n")
    _, data, old = retrain_cli.load_config(str(config))
    assert old == {} and resolve(RetrainSettings.from_dict(data).regularizer) == settings
    method = parse_method(f"retrain:{name},{field.name}={value_of(field)}")
    assert resolve(retrain_options(method)["regularizer"]) == settings


def captured(monkeypatch) -> list[RetrainSettings]:
    """The settings the CLI passes to ``retrain`` (which then does nothing)."""
    seen: list[RetrainSettings] = []

    def fake(inputs, settings, out, progress):
        seen.append(settings)
        return type("Result", (), {"out": None})()

    monkeypatch.setattr(retrain_cli, "retrain", fake)
    return seen


def invoke(*args: str):
    return CliRunner().invoke(retrain_cli.retrain_command, ["--aligned", "a", "--data", "d", *args])


def test_kl_weight_in_the_spec_and_the_former_flag_give_equal_settings(monkeypatch):
    seen = captured(monkeypatch)
    new = invoke("--regularizer", "kl:weight=0.3")
    old = invoke("--regularizer", "kl", "--kl-weight", "0.3")
    assert new.exit_code == old.exit_code == 0, old.output
    assert resolve(seen[0].regularizer) == resolve(seen[1].regularizer)
    assert resolve(seen[0].regularizer).weight == 0.3
    assert "warning" not in new.stderr
    warning = "warning: --kl-weight is deprecated; use --regularizer kl:weight=0.3\n"
    assert old.stderr == warning


@pytest.mark.parametrize("old, name, key", OLD, ids=lambda o: str(o))
def test_every_former_flag_and_config_key_gives_the_new_spellings_settings(
    monkeypatch, tmp_path, old, name, key
):
    field = next(
        f for f in dataclasses.fields(REGULARIZERS.get(name).settings_class) if f.name == key
    )
    value = value_of(field).strip("[]").replace(" ", "")  # as a flag takes a list: 1,2
    seen = captured(monkeypatch)
    config = tmp_path / "cfg.yaml"
    typed = getattr(resolve(f"{name}:{key}={value_of(field)}"), key)
    config.write_text(yaml.safe_dump({old: list(typed) if isinstance(typed, tuple) else typed}))
    results = [
        invoke("--regularizer", f"{name}:{key}={value_of(field)}"),
        invoke("--regularizer", name, "--" + old.replace("_", "-"), value),
        invoke("--regularizer", name, "--config", str(config)),
    ]
    assert [r.exit_code for r in results] == [0, 0, 0], results[1].output + results[2].output
    assert resolve(seen[0].regularizer) == resolve(seen[1].regularizer)
    assert resolve(seen[0].regularizer) == resolve(seen[2].regularizer)
    assert f"use --regularizer {name}:{key}=" in results[1].stderr
    assert f"cfg.yaml: {old} is deprecated; use regularizer: {name}:{key}=" in results[2].stderr


def test_a_spec_option_wins_over_a_former_flag_which_wins_over_a_former_config_key(
    monkeypatch, tmp_path
):
    seen = captured(monkeypatch)
    config = tmp_path / "cfg.yaml"
    config.write_text("regularizer: kl\nkl_weight: 0.1\nkl_direction: forward\n")
    result = invoke("--config", str(config), "--kl-weight", "0.2")
    assert result.exit_code == 0, result.output
    assert (resolve(seen[0].regularizer).weight, resolve(seen[0].regularizer).direction) == (
        0.2,
        "forward",
    )
    invoke("--config", str(config), "--kl-weight", "0.2", "--regularizer", "kl:weight=0.3")
    assert resolve(seen[1].regularizer).weight == 0.3


def test_a_former_flag_the_regularizer_does_not_take_is_ignored_with_a_warning(monkeypatch):
    seen = captured(monkeypatch)
    result = invoke("--regularizer", "sft", "--kl-weight", "0.3")
    assert result.exit_code == 0 and seen[0].regularizer == "sft"
    assert "warning: --kl-weight is deprecated and ignored: sft does not take it" in result.stderr


def test_a_bad_key_is_refused_in_one_line_naming_the_valid_keys(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n')
    args = ["--aligned", str(tmp_path), "--data", str(data), "--dry-run"]
    result = CliRunner().invoke(
        retrain_cli.retrain_command, [*args, "--regularizer", "kl:wieght=1"]
    )
    assert result.exit_code == 2
    assert result.output == (
        "Error: regularizer 'kl' has no option 'wieght' "
        "(options: weight, direction, chunk, form, betas)\n"
    )


def test_the_former_batch_size_is_the_gradient_batch_in_a_config_and_a_compare_spec(tmp_path):
    """retrain's gradient batch is grad_batch_size, its flag's name; batch_size, its former
    name, still works for a release, with a warning."""
    config = tmp_path / "cfg.yaml"
    config.write_text("batch_size: 4\n")
    with pytest.warns(OldSpelling, match="cfg.yaml: batch_size is now grad_batch_size"):
        _, data, _ = retrain_cli.load_config(str(config))
    assert RetrainSettings.from_dict(data).grad_batch_size == 4
    with pytest.warns(OldSpelling, match="batch_size is now grad_batch_size"):
        options = retrain_options(parse_method("retrain:kl,batch_size=4"))
        assert RetrainSettings.from_dict(options).grad_batch_size == 4
