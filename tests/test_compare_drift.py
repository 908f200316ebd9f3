"""compare with drift: the table column, ``--utility drift`` as the axis of the plot, the Pareto
front and the recommendation, and B as the evaluator's drift reference."""

from __future__ import annotations

import copy
import json
import struct

import pytest
from compare_support import stop_at_evaluator
from eval_support import save_tiny

from safealign.compare import MethodRow, pareto_names, plot_tradeoff
from safealign.compare import run as compare_run
from safealign.compare.report import recommend, table_rows, to_dict, write_report
from safealign.compare.result import CompareResult
from safealign.compare.settings import CompareInputs, CompareSettings
from safealign.settings import SettingsError


def _row(name, harmful, utility, drift, kind="merge", ci=None):
    scores = {
        "harmful_rate": {"value": harmful, "n": 10, "ci95": [0.0, 1.0]},
        "utility": {"value": utility, "n": 10, "ci95": [utility, utility]},
        "over_refusal": {"value": 0.0, "n": 10, "ci95": [0.0, 0.3]},
        "drift": {"value": drift, "n": 10, "ci95": ci or [drift, drift]},
    }
    return MethodRow(name, kind, "done", scores=scores, seconds=1.0)


ROWS = [
    _row("aligned", 0.0, 0.0, 2.0, kind="input"),
    _row("finetuned", 1.0, 1.0, 0.0, kind="input"),
    _row("interpolate", 0.02, 0.2, 1.5),  # safe, broke the most
    _row("recover", 0.02, 0.9, 0.3),  # as safe, kept B closest: recommended on either axis
    _row("close", 0.04, 0.95, 0.25),  # a bit more harmful, closer still: on both fronts
]


def _result(tmp_path, utility):
    rows = copy.deepcopy(ROWS)
    return CompareResult(tmp_path, rows, {}, {}, {}, utility=utility)


def test_drift_is_a_utility_axis_lower_is_better(tmp_path):
    assert pareto_names(ROWS, "drift") == {"aligned", "finetuned", "recover", "close"}
    result = _result(tmp_path, "drift")
    result.rows[-1].scores["utility"]["value"] = 0.5  # by task utility recover beats close
    assert pareto_names(result.rows) == {"aligned", "finetuned", "recover"}
    recommend(result, 0.05)
    assert result.recommendation["method"] == "close"
    assert result.recommendation["text"].startswith("close: the least drift (0.2500 nats)")
    recommend(result, 0.03)
    assert (result.recommendation["method"], result.recommendation["tied"]) == ("recover", [])
    result.rows[3].scores["drift"]["ci95"] = [0.1, 1.6]  # recover's interval reaches interpolate's
    recommend(result, 0.03)
    assert result.recommendation["tied"] == ["interpolate"]


def test_the_table_the_report_and_the_plot_show_drift(tmp_path):
    result = _result(tmp_path, "drift")
    recommend(result, 0.05)
    rows = {row["name"]: row for row in table_rows(result)}
    assert rows["interpolate"]["drift"] == 1.5 and rows["interpolate"]["pareto"] == ""
    assert rows["close"]["pareto"] == "*"
    write_report(result)
    header = (tmp_path / "report.md").read_text().split("\n| name")[1].splitlines()[0]
    assert "| drift" in header
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["utility"] == "drift"
    assert report["rows"][2]["scores"]["drift"] == {"value": 1.5, "n": 10, "ci95": [1.5, 1.5]}
    assert report["pareto"] == sorted(pareto_names(result.rows, "drift"))
    for utility in ("drift", "task"):
        png = plot_tradeoff({**to_dict(result), "utility": utility}, tmp_path / f"{utility}.png")
        data = png.read_bytes()
        assert struct.unpack(">II", data[16:24]) == (1140, 600)
    assert (tmp_path / "drift.png").read_bytes() != (tmp_path / "task.png").read_bytes()


def test_b_is_the_drift_reference_an_adapter_on_a_when_it_is_one(tmp_path):
    save_tiny(tmp_path / "a")
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    benign = ["write poem"]
    full = CompareInputs(aligned=tmp_path / "a", finetuned=tmp_path / "a", benign=benign)
    assert compare_run.drift_reference(full) == {"drift_reference": tmp_path / "a"}
    lora = CompareInputs(aligned=tmp_path / "a", finetuned=adapter, benign=benign)
    assert compare_run.drift_reference(lora) == {
        "drift_reference": tmp_path / "a",
        "drift_reference_adapter": adapter,
    }
    assert compare_run.drift_reference(CompareInputs(tmp_path / "a", adapter)) == {}


def test_compare_scores_drift_from_b_and_refuses_drift_without_benign(tmp_path, monkeypatch):
    seen = stop_at_evaluator(monkeypatch)
    inputs = CompareInputs(aligned=tmp_path, finetuned=tmp_path, harmful=["a prompt"])
    settings = CompareSettings(utility="drift", drift_tokens=8)
    with pytest.raises(SettingsError, match="--utility drift needs --benign"):
        compare_run.compare(inputs, settings, tmp_path / "out")
    with_benign = CompareInputs(tmp_path, tmp_path, harmful=["a prompt"], benign=["hello"])
    with pytest.raises(KeyboardInterrupt):
        compare_run.compare(with_benign, settings, tmp_path / "out")
    assert (seen["drift_reference"], seen["drift_tokens"]) == (tmp_path, 8)
    with pytest.raises(SettingsError, match="--utility must be one of task, drift"):
        CompareSettings(utility="perplexity")
