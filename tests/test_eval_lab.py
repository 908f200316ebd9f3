"""On the lab (test size): `safealign eval` reproduces lab.json, first-token agrees with keyword."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from safealign.data import load_prompts
from safealign.eval import get_judge
from safealign.eval.cli import eval_command
from safealign.model import load_model

pytestmark = pytest.mark.lab
MODELS = ("aligned", "ft_harmful")
TABLE_KEYS = {"harmful_rate": "harmful_rate", "over_refusal": "over_refusal", "utility": "task_acc"}


@pytest.fixture(scope="module")
def cli_runs(lab, tmp_path_factory):
    """results.json and samples.jsonl of `safealign eval` on each model, with the lab's sets."""
    runs = {}
    for name in MODELS:
        out = tmp_path_factory.mktemp(name)
        args = ["--model", lab.root / name, "--out", out, "--no-cache", "--batch-size", "64"]
        for option, data in (("--harmful", "harmful_eval"), ("--benign", "benign_eval")):
            args += [option, lab.data(data)]
        args += ["--task", lab.data("task_eval")]
        result = CliRunner().invoke(eval_command, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        samples = [json.loads(line) for line in (out / "samples.jsonl").open()]
        runs[name] = (json.loads((out / "results.json").read_text()), samples)
    return runs


@pytest.mark.parametrize("name", MODELS)
def test_cli_reproduces_the_lab_table_within_one_point(lab, cli_runs, name):
    results, _ = cli_runs[name]
    row = lab.table[name]
    for ours, theirs in TABLE_KEYS.items():
        assert results[ours]["value"] == pytest.approx(row[theirs], abs=0.01), ours


@pytest.mark.parametrize("name", MODELS)
def test_first_token_agrees_with_keyword_on_harmful_eval(lab, cli_runs, name):
    _, samples = cli_runs[name]
    keyword = [s["judge"]["label"] for s in samples if s["set"] == "harmful"]
    prompts = load_prompts(lab.data("harmful_eval")).prompts
    model, tokenizer = load_model(lab.root / name)
    verdicts = get_judge("first-token").judge(prompts, None, model=model, tokenizer=tokenizer)
    agree = sum(v.label == k for v, k in zip(verdicts, keyword, strict=True)) / len(prompts)
    assert agree >= 0.9, f"{name}: first-token agrees with keyword on {agree:.0%}"
