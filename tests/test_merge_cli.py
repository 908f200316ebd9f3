"""``safealign merge`` and its settings: flags, one-line refusals, previews that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from merge_support import build_tiny_models, read_weights

from safealign.checkpoint import ADAPTER_CONFIG_NAME, Checkpoint
from safealign.command import OldSpelling
from safealign.merge import MergeConfigError, MergeSettings, run_merge, safety_config
from safealign.merge.cli import merge_command
from safealign.settings import SettingsError

Q0 = "model.layers.0.self_attn.q_proj.weight"
FLAGS = (
    "--out --method --aligned --unaligned --finetuned --safety --harmful-model --dtype "
    "--device --out-shard-size --output-type --dry-run --seed --overwrite --quiet --json"
).split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def invoke(*args):
    return CliRunner().invoke(merge_command, [str(a) for a in args])


def shortcut(tiny, method="safemerge", *extra):
    roles = ["--aligned", tiny.aligned, "--unaligned", tiny.unaligned, "--finetuned"]
    return invoke("--method", method, *roles, tiny.lora, "--quiet", *extra)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def test_flags_keep_their_names_and_flags_take_no_value(tiny, tmp_path):
    help_text = invoke("--help").output
    assert all(flag in help_text for flag in FLAGS), help_text
    out = tmp_path / "o"
    assert shortcut(tiny, "safe_lora", "--out", out).exit_code == 0
    again = shortcut(tiny, "safe_lora", "--out", out, "--seed", 3)
    assert again.exit_code == 2 and "not empty" in again.output
    result = shortcut(tiny, "safe_lora", "--out", out, "--overwrite", "--seed", 3)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "merge_report.json").read_text())["seed"] == 3


def test_unknown_method_lists_the_shortcut_methods(tiny):
    result = shortcut(tiny, "safemerg", "--dry-run")
    assert result.exit_code == 2
    assert error_lines(result) == [
        "Error: --method must be one of csulora, interpolate, resta, safe_lora, safemerge, "
        "got 'safemerg'"
    ]


@pytest.mark.parametrize(
    "value, message",
    [
        ("tau", "Error: Invalid value for --set: expected KEY=VALUE, got 'tau'"),
        ("weights=[0.2,", "Error: Invalid value for --set: '[0.2,' is not a YAML value"),
        ("tua=0.5", "Error: safemerge: unknown parameter 'tua' (known: combination, tau, weights)"),
        ("tau=high", "Error: parameters.tau: must be a number, got 'high'"),
    ],
)
def test_a_bad_set_is_refused_in_one_line(tiny, tmp_path, value, message):
    result = shortcut(tiny, "safemerge", "--set", value, "--out", tmp_path / "never")
    assert result.exit_code != 0
    assert error_lines(result) == [message]
    assert "Traceback" not in result.output
    assert not (tmp_path / "never").exists()


def test_dry_run_validates_scores_and_writes_nothing(tiny, tmp_path):
    config = tmp_path / "safe_lora.yaml"
    data = safety_config(
        "safe_lora", aligned=tiny.aligned, unaligned=tiny.unaligned, finetuned=tiny.lora
    ).to_dict()
    config.write_text(yaml.safe_dump(data))
    result = invoke(config, "--dry-run", "--quiet", "--out", tmp_path / "never")
    assert result.exit_code == 0, result.output
    assert "| name" in result.output and Q0 in result.output
    assert "safe_lora: validated, nothing written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["safe_lora.yaml"]


def test_method_spec_options_are_parameters_and_set_wins(tiny):
    result = shortcut(tiny, "safe_lora:select=lowest,k=2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "2/9 layers selected" in result.output
    result = shortcut(tiny, "safe_lora:select=lowest,k=2", "--set", "k=3", "--score")
    assert "3/9 layers selected" in result.output  # the deprecated spellings still work
    assert "warning: --set is deprecated; use --method NAME:key=value,..." in result.stderr
    assert "warning: --score is deprecated; use --dry-run" in result.stderr


def test_config_and_shortcut_together_are_refused(tiny, tmp_path):
    result = invoke(tmp_path / "x.yaml", "--method", "resta", "--dry-run")
    assert result.exit_code == 2
    assert error_lines(result) == ["Error: give a CONFIG file or the --method shortcut, not both"]


def test_settings_are_checked_and_read_by_the_api(tiny, tmp_path):
    with pytest.raises(SettingsError, match="--output-type must be one of auto, model, adapter"):
        MergeSettings(output_type="lora")
    with pytest.warns(OldSpelling, match="output is now output_type"):
        assert MergeSettings().replace(output="model").output_type == "model"
    config = safety_config("interpolate", aligned=tiny.aligned, finetuned=tiny.lora)
    settings = MergeSettings(output_type="model", seed=5)
    model = run_merge(config, settings, tmp_path / "m")
    assert (model.report["output"], model.report["seed"]) == ("model", 5)
    assert set(read_weights(model.out)) == set(read_weights(tiny.aligned))
    adapter = run_merge(config, settings.replace(output_type="adapter"), tmp_path / "a")
    assert (adapter.report["output"], adapter.report["seed"]) == ("adapter", 5)
    assert (adapter.out / ADAPTER_CONFIG_NAME).exists()
    dry = run_merge(config, settings.replace(dry_run=True))
    assert dry.out is None and dry.report["output"] == "model"
    with pytest.raises(MergeConfigError, match="an output folder is required"):
        run_merge(config, settings)


def test_cli_score_prints_table_and_writes_nothing(tiny, tmp_path):
    runner = CliRunner()
    args = ["--method", "safemerge", "--aligned", str(tiny.aligned), "--unaligned"]
    args += [str(tiny.unaligned), "--finetuned", str(tiny.finetuned), "--score", "--quiet"]
    args += ["--set", "tau=0.5", "--out", str(tmp_path / "never")]
    result = runner.invoke(merge_command, args)
    assert result.exit_code == 0, result.output
    assert "| name" in result.output and "rho" in result.output and Q0 in result.output
    assert "nothing written" in result.output
    assert not (tmp_path / "never").exists()


def test_cli_config_merge_and_clear_errors(tiny, tmp_path):
    config = tmp_path / "lin.yaml"
    models = [
        {"model": str(tiny.aligned), "parameters": {"weight": 1.0}},
        {"model": str(tiny.finetuned), "parameters": {"weight": 3.0}},
    ]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    runner = CliRunner()
    result = runner.invoke(merge_command, [str(config), "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 0, result.output
    a, b, out = (read_weights(p) for p in (tiny.aligned, tiny.finetuned, tmp_path / "o"))
    torch.testing.assert_close(out[Q0], (a[Q0] + 3 * b[Q0]) / 4)
    again = runner.invoke(merge_command, [str(config), "--out", str(tmp_path / "o"), "--quiet"])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = runner.invoke(merge_command, [str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "merge config not found" in bad.output


def test_config_with_positional_out_and_dtype_as_mergekit_yaml_takes_them(tiny, tmp_path):
    config = tmp_path / "lin.yaml"
    models = [
        {"model": str(m), "parameters": {"weight": 1.0}} for m in (tiny.aligned, tiny.finetuned)
    ]
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    out = tmp_path / "out"
    result = invoke(config, out, "--dtype", "bf16", "--quiet")
    assert result.exit_code == 0, result.output
    merged = Checkpoint.open(out)
    assert {merged.dtype(name) for name in merged.names()} == {torch.bfloat16}
    assert "| name" not in result.output  # a merge prints a summary, not the layer table


def test_a_missing_role_is_named_by_its_flag(tiny, tmp_path):
    args = ["--method", "safemerge", "--aligned", tiny.aligned, "--finetuned", tiny.lora]
    result = invoke(*args, "--out", tmp_path / "never")
    assert result.exit_code == 2
    assert error_lines(result) == ["Error: safemerge needs --unaligned"]


def test_a_safety_merge_prints_one_screen_and_keeps_the_table_in_its_report(tiny, tmp_path):
    out = tmp_path / "o"
    result = shortcut(tiny, "safe_lora", "--out", out)
    assert result.exit_code == 0, result.output
    assert "| name" not in result.output and len(result.output.splitlines()) <= 10
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["layers"]) == report["layers_scored"] == 9
