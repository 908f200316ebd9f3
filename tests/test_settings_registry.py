"""The shared settings object and registry helper every command and family uses."""

from __future__ import annotations

from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from safealign.registry import Registry, RegistryError, parse_options
from safealign.settings import Settings, SettingsError, click_options, from_cli, setting


@dataclass
class Demo(Settings):
    rate: float = setting(0.002, help="Share per step.", min=0, max=1, min_open=True, max_open=True)
    steps: int = setting(20, help="Steps.", min=1)
    layer: int | None = setting(None, help="Layer.", min=0, default_text="floor(4n/6)")
    mode: str = setting("paper", help="Schedule.", choices=("paper", "guarded"))
    sweep: tuple[float, ...] = setting((), help="Rates.", min=0, max=1, min_open=True)
    fp32: bool = setting(True, help="Accumulate in fp32.")
    dry_run: bool = setting(False, help="Plan only.")
    hidden: str = setting("x", help="Not a flag.", cli=False)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rate": 0.0}, "--rate must be in (0, 1), got 0.0"),
        ({"rate": 1.5}, "--rate must be in (0, 1), got 1.5"),
        ({"rate": float("nan")}, "--rate must be in (0, 1), got nan"),
        ({"steps": 0}, "--steps must be >= 1, got 0"),
        ({"layer": -1}, "--layer must be >= 0, got -1"),
        ({"mode": "other"}, "--mode must be one of paper, guarded, got 'other'"),
        ({"sweep": (0.1, 2.0)}, "--sweep must be in (0, 1], got 2.0"),
    ],
)
def test_out_of_range_names_the_flag(changes, message):
    with pytest.raises(SettingsError) as error:
        Demo(**changes)
    assert str(error.value) == message


def test_from_dict_refuses_unknown_keys_and_lists_known():
    with pytest.raises(SettingsError, match="cfg.yaml: unknown key 'ratee'; known keys: dry_run"):
        Demo.from_dict({"ratee": 0.1}, where="cfg.yaml")
    loaded = Demo.from_dict({"rate": 0.01, "sweep": [0.1, 0.2], "dry-run": True})
    assert (loaded.rate, loaded.sweep, loaded.dry_run) == (0.01, (0.1, 0.2), True)
    assert Demo.from_dict(loaded.to_dict()) == loaded
    assert loaded.to_dict()["sweep"] == [0.1, 0.2]


def _command(base=None):
    seen = {}

    @click.command()
    @click.option("--out")
    @click_options(Demo)
    def command(**values):
        seen["settings"], seen["rest"] = from_cli(Demo, values, base)

    return command, seen


def test_cli_options_are_generated_from_the_settings():
    command, seen = _command()
    result = CliRunner().invoke(
        command, ["--rate", "0.01", "--sweep", "0.1,0.2", "--no-fp32", "--dry-run", "--out", "o"]
    )
    assert result.exit_code == 0, result.output
    assert seen["settings"] == Demo(rate=0.01, sweep=(0.1, 0.2), fp32=False, dry_run=True)
    assert seen["rest"] == {"out": "o"}
    help_text = CliRunner().invoke(command, ["--help"]).output
    assert "--hidden" not in help_text
    assert "floor(4n/6)" in help_text and "--dry-run" in help_text


def test_typed_flags_override_a_config_and_defaults_do_not():
    command, seen = _command(base={"rate": 0.05, "steps": 7})
    assert CliRunner().invoke(command, ["--steps", "3"]).exit_code == 0
    assert (seen["settings"].rate, seen["settings"].steps) == (0.05, 3)


def test_cli_range_error_is_a_settings_error():
    command, _ = _command()
    result = CliRunner().invoke(command, ["--rate", "2"])
    assert isinstance(result.exception, SettingsError)


def test_registry_lookup_spec_and_errors():
    things: Registry = Registry("judge")

    @things.register("keyword")
    class Keyword:
        def __init__(self, strict: bool = False, k: int = 1):
            self.strict, self.k = strict, k

    @things.register("classifier")
    class Classifier:
        def __init__(self, path: str):
            self.path = path

    made = things.create("keyword:strict=true,k=3")
    assert (made.name, made.strict, made.k) == ("keyword", True, 3)
    assert things.create("classifier:/m/x", positional="path").path == "/m/x"
    with pytest.raises(
        RegistryError, match="unknown judge 'kw': choose one of classifier, keyword"
    ):
        things.get("kw")
    with pytest.raises(RegistryError, match="judge 'keyword:nope=1'"):
        things.create("keyword:nope=1")
    with pytest.raises(RegistryError, match="registered twice"):
        things.register("keyword")(Keyword)
    assert list(things) == ["classifier", "keyword"] and "keyword" in things


def test_parse_options_types_and_errors():
    assert parse_options("a=1, b=0.5,c=true,d=x/y") == {"a": 1, "b": 0.5, "c": True, "d": "x/y"}
    with pytest.raises(RegistryError, match="'flag' is not key=value"):
        parse_options("flag")
