"""compare on the test-size lab: methods equal their own commands, skips and failures are
recorded without stopping the others, and --resume runs only what is unfinished."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from safealign.checkpoint import Checkpoint
from safealign.compare import CompareSettings, compare
from safealign.compare.methods import safety_merge_config
from safealign.compare.run import score_checkpoint
from safealign.lab.compare import BATCH_SIZE, lab_evaluator, lab_inputs
from safealign.merge import run_merge
from safealign.merge.cli import merge_command

pytestmark = pytest.mark.lab

MERGES = ("interpolate:alpha=0.5", "safe_lora:tau=0.35")


def _compare(lab, out, methods, inputs=None, **settings):
    settings = CompareSettings(methods=methods, batch_size=BATCH_SIZE, **settings)
    lines: list[str] = []
    result = compare(inputs or lab_inputs(lab), settings, out, lines.append)
    return result, lines


def _rows(result):
    return {row.name: row for row in result.rows}


def _same_tensors(a, b, aligned) -> bool:
    with Checkpoint.open(a, base=aligned) as x, Checkpoint.open(b, base=aligned) as y:
        return all(torch.equal(x.get(n), y.get(n)) for n in y.names())


@pytest.fixture(scope="module")
def merged(lab, tmp_path_factory):
    return _compare(lab, tmp_path_factory.mktemp("cmp") / "out", MERGES)[0]


def test_methods_equal_their_own_commands(lab, merged, tmp_path):
    rows = _rows(merged)
    evaluator = lab_evaluator(lab)
    # interpolate through `safealign merge`, safe_lora through the merge API
    args = ["--method", "interpolate", "--aligned", str(lab.aligned)]
    args += ["--finetuned", str(lab.ft_harmful_lora), "--set", "alpha=0.5"]
    cli = CliRunner().invoke(merge_command, [*args, "--out", str(tmp_path / "interp")])
    assert cli.exit_code == 0, cli.output
    own = {
        "interpolate:alpha=0.5": tmp_path / "interp",
        "safe_lora:tau=0.35": run_merge(
            safety_merge_config("safe_lora", lab_inputs(lab), {"tau": 0.35}),
            None,
            tmp_path / "sl",
        ).out,
    }
    for name, folder in own.items():
        row = rows[name]
        assert row.status == "done", row.reason
        assert _same_tensors(row.out, folder, lab.aligned)
        scores = score_checkpoint(evaluator, folder, lab.aligned).to_dict()
        for key in ("harmful_rate", "utility", "over_refusal"):
            assert row.scores[key] == scores[key]
    assert 0 < rows["interpolate:alpha=0.5"].changed_share <= 1
    report = json.loads((merged.out / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["aligned", "finetuned", "unaligned", *MERGES]
    assert (merged.out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "**Recommendation.**" in (merged.out / "report.md").read_text()


def test_missing_inputs_skip_and_a_failure_does_not_stop_the_others(lab, tmp_path):
    inputs = dataclasses.replace(lab_inputs(lab), unaligned=None, train_data=None)
    # recover:layer=99 passes the spec check (layer >= 1) and fails once the 4-layer model is
    # opened: a failure at run time, recorded
    methods = ("safe_lora", "retrain:kl", "recover:layer=99", "interpolate:alpha=0.5")
    result, _ = _compare(lab, tmp_path / "out", methods, inputs=inputs)
    rows = _rows(result)
    assert (rows["safe_lora"].status, rows["safe_lora"].reason) == (
        "skipped",
        "safe_lora needs --unaligned",
    )
    assert rows["retrain:kl"].status == "skipped"
    assert rows["retrain:kl"].reason == "retrain needs the fine-tuning data (--train-data)"
    failed = rows["recover:layer=99"]
    assert failed.status == "failed" and "\n" not in failed.reason and failed.scores is None
    assert rows["interpolate:alpha=0.5"].status == "done"


def test_resume_runs_only_unfinished_methods(lab, merged, tmp_path):
    out = tmp_path / "out"
    first, _ = _compare(lab, out, MERGES)
    # an interruption after the first method: the second left no record
    (out / "runs" / "safe_lora_tau-0.35.json").unlink()
    kept = out / "models" / "interpolate_alpha-0.5"
    stamp = {p.name: p.stat().st_mtime_ns for p in kept.iterdir()}
    again, lines = _compare(lab, out, MERGES, resume=True)
    assert any("interpolate:alpha=0.5: reused" in line for line in lines)
    assert any("safe_lora:tau=0.35: running" in line for line in lines)
    assert not any("interpolate:alpha=0.5: running" in line for line in lines)
    assert {p.name: p.stat().st_mtime_ns for p in kept.iterdir()} == stamp
    rerun, before = _rows(again)["safe_lora:tau=0.35"], _rows(first)["safe_lora:tau=0.35"]
    for key in ("harmful_rate", "utility", "over_refusal"):
        assert rerun.scores[key] == before.scores[key]
