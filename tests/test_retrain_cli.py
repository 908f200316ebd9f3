"""``retrain_command`` through click's CliRunner: YAML config with flag overrides, bad input
refused in one line before training."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from retrain_support import setup_files, write_jsonl

from safealign.retrain.cli import PATH_KEYS, retrain_command


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return setup_files(tmp_path_factory.mktemp("retrain_cli"))


def invoke(*args: str):
    return CliRunner().invoke(retrain_command, list(args), catch_exceptions=False)


def test_yaml_config_is_read_and_typed_flags_override_it(files, tmp_path):
    config = tmp_path / "retrain.yaml"
    config.write_text(
        f"aligned: {files['aligned']}\ndata: {files['data']}\nregularizer: sft\n"
        "epochs: 2\ngrad-batch-size: 4\nlr: 0.01\n"
    )
    out = tmp_path / "out"
    result = invoke("--config", str(config), "--out", str(out), "--epochs", "1")
    assert result.exit_code == 0, result.output
    rows = (out / "train_log.jsonl").read_text().splitlines()
    assert len(rows) == 1 + 2  # plan, then 1 epoch (flag) of 8 examples in batches of 4 (config)
    assert "nll" in json.loads(rows[1]) and "kl" not in json.loads(rows[1])
    assert "| regularizer | sft |" in (out / "README.md").read_text()


def bad_data(tmp_path, name: str):
    if name == "empty":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
    elif name == "malformed":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    else:
        path = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a"}])
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "empty file: "),
        ("malformed", "malformed JSON (Expecting value): "),
        ("missing", "missing response field"),
        ("long", "every prompt is longer than --max-length 4: "),
        ("option", "regularizer 'kl' has no option 'wieght' (options: weight, direction"),
        ("resume", "--resume: no checkpoint in "),
        ("yaml", "cfg.yaml: unknown key 'epoch'; known keys: "),
        ("interleave", "interleave: the score needs a misaligned model: give interleave:"),
        ("misaligned", "interleave:misaligned: "),
        ("select", "interleave:select must be one of gap, random, got 'best'"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_training(files, tmp_path, case, message):
    out = tmp_path / "out"
    args = ["--aligned", files["aligned"], "--out", str(out), "--harmful", files["harmful"]]
    args += ["--benign", files["benign"]]
    data = files["data"]
    if case in ("empty", "malformed", "missing"):
        data = bad_data(tmp_path, case)
    elif case == "long":
        args += ["--max-length", "4"]
    elif case == "option":
        args += ["--regularizer", "kl:wieght=2"]
    elif case == "resume":
        args += ["--resume"]
    elif case == "yaml":
        (tmp_path / "cfg.yaml").write_text("epoch: 2\n")
        args += ["--config", str(tmp_path / "cfg.yaml")]
    elif case == "interleave":
        args += ["--regularizer", "interleave"]
    elif case == "misaligned":
        args += ["--regularizer", f"interleave:misaligned={tmp_path / 'no-such-model'}"]
    elif case == "select":
        args += ["--regularizer", "interleave:select=best"]
    result = invoke(*args, "--data", data)
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_regularizer_that_reads_harmful_prompts_names_the_smoke_set_it_falls_back_on(files):
    args = ["--aligned", files["aligned"], "--data", files["data"], "--dry-run"]
    result = CliRunner().invoke(retrain_command, [*args, "--regularizer", "der"])
    assert result.exit_code == 0, result.output
    assert "warning: --harmful not given: using the bundled smoke set smoke_harmful" in (
        result.stderr
    )
    plain = CliRunner().invoke(retrain_command, [*args, "--regularizer", "sft"])
    assert plain.exit_code == 0 and "warning" not in plain.stderr


def test_default_regularizer_trains_from_the_command_line(files, tmp_path):
    out = tmp_path / "out"
    args = ["--aligned", files["aligned"], "--data", files["data"], "--out", str(out)]
    args += ["--harmful", files["harmful"], "--benign", files["benign"], "--epochs", "1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "critic.json").read_text())["critic"] == "probe"  # adaptive-kl
    card = (out / "README.md").read_text()  # every option of the regularizer, none of another
    assert "| adaptive-kl:beta_min | 0.1 |" in card and "| adaptive-kl:critic | probe |" in card
    assert "kl_weight" not in card and "| kl:" not in card


def test_example_configs_are_valid_settings():
    from pathlib import Path

    import yaml

    from safealign.retrain import RetrainSettings

    examples = sorted((Path(__file__).parents[1] / "examples").glob("retrain_*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        data = yaml.safe_load(path.read_text())
        inputs = {key: data.pop(key) for key in PATH_KEYS if key in data}
        assert {"aligned", "data", "out"} <= set(inputs)
        RetrainSettings.from_dict(data, where=str(path))
