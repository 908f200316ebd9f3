"""compare without the lab: method specs, the Pareto front, the recommendation, the report, and
a recover row where no repair held (on tiny random models)."""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner
from compare_support import stop_at_evaluator
from recover_support import HARMFUL, NO_REPAIR, TASK_PROMPTS, make_pair, no_repair_case

from safealign.command import OldSpelling
from safealign.compare import MethodRow, pareto_names, parse_method, plot_tradeoff
from safealign.compare import run as compare_run
from safealign.compare.cli import compare_command
from safealign.compare.methods import join_specs, retrain_options
from safealign.compare.report import recommend, table_rows, to_dict, write_report
from safealign.compare.result import CompareResult
from safealign.compare.run import method_specs
from safealign.compare.settings import CompareInputs, CompareSettings
from safealign.registry import RegistryError


def _row(name, harmful, utility, kind="merge", status="done", refusal=0.1):
    scores = None
    if harmful is not None:
        scores = {
            "harmful_rate": {"value": harmful, "n": 10, "ci95": [0.0, 1.0]},
            "utility": {"value": utility, "n": 10, "ci95": [utility - 0.05, utility + 0.05]},
            "over_refusal": {"value": refusal, "n": 10, "ci95": [0.0, 1.0]},
        }
    return MethodRow(name, kind, status, scores=scores, seconds=1.0)


def _result(tmp_path, rows):
    return CompareResult(out=tmp_path, rows=rows, settings={}, inputs={}, evaluator={})


def test_specs_parse_as_the_capabilities_name_them():
    assert parse_method("recover:rate=0.005").options == {"rate": 0.005}
    spec = parse_method("retrain:kl,weight=0.2,epochs=2")
    options = {"weight": 0.2, "epochs": 2}
    assert (spec.family, spec.method, spec.options) == ("retrain", "kl", options)
    assert retrain_options(spec) == {"regularizer": "kl:weight=0.2", "epochs": 2}
    spec = parse_method("safemerge:tau=0.5,weights=[0.2, 0.8]")
    assert (spec.family, spec.options) == ("merge", {"tau": 0.5, "weights": [0.2, 0.8]})
    assert spec.slug == "safemerge_tau-0.5-weights-0.2-0.8"
    assert join_specs(["recover", "retrain:kl", "weight=0.2", "safe_lora:tau=0.3"]) == [
        "recover",
        "retrain:kl,weight=0.2",
        "safe_lora:tau=0.3",
    ]


def test_a_retrain_option_under_its_former_name_still_works_with_a_warning():
    with pytest.warns(OldSpelling, match="kl_weight is deprecated; use retrain:kl,weight=0.2"):
        old = retrain_options(parse_method("retrain:kl,kl_weight=0.2"))
    assert old == retrain_options(parse_method("retrain:kl,weight=0.2"))
    with pytest.warns(OldSpelling, match="kl_weight is deprecated and ignored: sft does not"):
        assert retrain_options(parse_method("retrain:sft,kl_weight=0.2")) == {"regularizer": "sft"}


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "ties",
            "unknown method 'ties': choose recover, safetylock, retrain:REGULARIZER or one of",
        ),
        ("retrain", "name a regularizer, e.g. retrain:kl"),
        ("recover:rate", "option 'rate' is not key=value"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        parse_method(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("retrain:klx", "unknown regularizer 'klx'"),
        ("safe_lora:tua=0.3", "safe_lora: unknown parameter 'tua'"),
        ("recover:rat=0.1", "unknown key 'rat'"),
        ("retrain:kl,weight=-1", "kl:weight must be >= 0"),
        ("retrain:kl,wieght=1", "'wieght' is neither a retrain setting nor a kl option (weight, "),
    ],
)
def test_a_bad_method_exits_2_in_one_line_before_any_model_is_loaded(
    tmp_path, monkeypatch, spec, message
):
    loads = []

    def counted(*args, **kwargs):
        loads.append(args)
        raise AssertionError("a model was opened")

    monkeypatch.setattr("safealign.eval.evaluator.load_model", counted)
    monkeypatch.setattr("safealign.checkpoint.Checkpoint.open", counted)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "h.jsonl").write_text('{"prompt": "p"}\n')
    args = ["--aligned", tmp_path / "a", "--finetuned", tmp_path / "b"]
    args += ["--harmful", tmp_path / "h.jsonl", "--methods", spec, "--out", tmp_path / "o"]
    result = CliRunner().invoke(compare_command, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error:") and message in errors[0]
    assert loads == [] and not (tmp_path / "o").exists()


def test_pareto_front_and_recommendation(tmp_path):
    rows = [
        _row("aligned", 0.02, 0.1, kind="input"),
        _row("finetuned", 0.9, 1.0, kind="input"),
        _row("a", 0.05, 0.8),  # front, under the bound: recommended
        _row("b", 0.06, 0.7),  # beaten by a
        _row("c", 0.3, 0.95),  # front, over the bound
        _row("d", 0.05, 0.8, status="failed"),
        _row("e", None, None, status="skipped"),
    ]
    assert pareto_names(rows) == {"aligned", "finetuned", "a", "c"}
    result = _result(tmp_path, rows)
    recommend(result, None)
    assert result.max_harmful_rate == pytest.approx(0.07)
    assert result.recommendation["method"] == "a"
    recommend(result, 0.01)
    assert result.recommendation["method"] is None
    assert "No method reached a harmful rate of 0.01" in result.recommendation["text"]


def _scored(row: MethodRow, utility_ci: tuple[float, float]) -> MethodRow:
    row.scores["utility"]["ci95"] = list(utility_ci)
    return row


def test_recommendation_holds_over_refusal_to_its_bound_and_names_ties(tmp_path):
    """Two rows equal on harm and utility: the one refusing more benign prompts than A + 0.05
    is marked and never recommended; rows whose utility intervals overlap the best's are named
    as tied with it, never split by speed."""
    aligned = _row("aligned", 0.02, 0.1, kind="input", refusal=0.04)
    rows = [aligned, _row("finetuned", 0.9, 1.0, kind="input", refusal=0.0)]
    rows += [
        _scored(_row("refuses", 0.03, 0.8, refusal=0.30), (0.75, 0.85)),
        _scored(_row("keeps", 0.03, 0.8, refusal=0.05), (0.75, 0.85)),
        _scored(_row("close", 0.04, 0.78, refusal=0.08), (0.70, 0.76)),
        _scored(_row("far", 0.04, 0.5, refusal=0.0), (0.45, 0.55)),
    ]
    result = _result(tmp_path, rows)
    recommend(result, None)
    assert result.max_over_refusal == pytest.approx(0.09)
    assert result.recommendation["method"] == "keeps"
    assert result.recommendation["tied"] == ["close"]
    assert "tied within the 95% intervals with close" in result.recommendation["text"]
    marks = {r["name"]: r["over_bounds"] for r in table_rows(result)}
    assert marks == {"aligned": "", "finetuned": "", "refuses": "over-refusal", "keeps": "",
                     "close": "", "far": ""}  # fmt: skip
    recommend(result, None, 0.01)  # an explicit bound only "far" meets
    assert (result.recommendation["method"], result.recommendation["tied"]) == ("far", [])
    recommend(result, 0.01, 0.01)
    assert result.recommendation["method"] is None
    assert "with over-refusal of 0.01 or less" in result.recommendation["text"]


def test_no_method_is_recommended_that_keeps_no_more_utility_than_the_aligned_model(tmp_path):
    """A method within the bounds but no more useful than A beyond the 95% intervals (a KL that
    stopped the task with the harm) is no repair to recommend: the recommendation says so and
    names none; one whose utility interval lies above A's is recommended."""
    rows = [_row("aligned", 0.0, 0.0, kind="input"), _row("finetuned", 1.0, 1.0, kind="input")]
    rows += [_row("stops-all", 0.0, 0.0), _row("harmful", 0.5, 1.0)]
    result = _result(tmp_path, rows)
    recommend(result, None)
    assert result.recommendation["method"] is None
    assert "keeps more utility than the aligned model (0.000)" in result.recommendation["text"]
    assert "stops-all, reached 0.000" in result.recommendation["text"]
    rows.append(_row("a-little", 0.03, 0.05))  # above A's, within its interval: a tie with A
    recommend(result, None)
    assert result.recommendation["method"] is None
    assert "a-little, reached 0.050" in result.recommendation["text"]
    rows.append(_row("keeps-some", 0.03, 0.2))
    recommend(result, None)
    assert result.recommendation["method"] == "keeps-some"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_schema_and_plot_from_a_stored_report(tmp_path):
    rows = [_row("aligned", 0.0, 0.0, kind="input"), _row("finetuned", 1.0, 1.0, kind="input")]
    rows += [_row("m1", 0.1, 0.9), _row("m2", 0.1, 0.9), _row("skip", None, None, status="skipped")]
    result = _result(tmp_path, rows)
    recommend(result, None)
    stored = tmp_path / "report.json"
    stored.write_text(json.dumps(to_dict(result)))
    report = json.loads(stored.read_text())
    assert report["schema_version"] == 1
    assert set(report) >= {"settings", "inputs", "evaluator", "pareto", "recommendation", "rows"}
    assert report["pareto"] == ["aligned", "finetuned", "m1", "m2"]
    for row in report["rows"]:
        assert set(row) >= {"name", "kind", "status", "reason", "scores", "changed_share"}
        for entry in (row["scores"] or {}).values():
            assert set(entry) == {"value", "n", "ci95"}
    png = plot_tradeoff(report, tmp_path / "plot.png")
    width, height = _png_size(png)
    assert (width, height) == (1140, 600)


def test_cli_refuses_bad_input_in_one_line_before_work(tmp_path):
    model = tmp_path / "a"
    model.mkdir()
    runner = CliRunner()
    (tmp_path / "h.jsonl").write_text('{"prompt": "x"}\n')
    harmful = str(tmp_path / "h.jsonl")
    base = ["--aligned", str(model), "--out", str(tmp_path / "o"), "--harmful", harmful]
    result = runner.invoke(compare_command, [*base, "--finetuned", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: --finetuned: {tmp_path / 'missing'} does not exist"
    ]
    result = runner.invoke(compare_command, [*base, "--finetuned", str(model), "--methods", "x"])
    assert result.exit_code == 2 and "unknown method 'x'" in result.output
    result = runner.invoke(
        compare_command, [*base, "--finetuned", str(model), "--max-harmful-rate", "2"]
    )
    assert (
        result.exit_code == 2 and "--max-harmful-rate must be in [0, 1], got 2.0" in result.output
    )
    assert not (tmp_path / "o").exists()


def test_seed_and_limit_reach_the_evaluator_and_every_retrain_method(tmp_path, monkeypatch):
    settings = CompareSettings(
        methods=("recover", "retrain:kl", "retrain:sft,seed=3"),
        retrain_options="epochs=2",
        seed=7,
        limit=5,
    )
    options = {spec.spec: spec.options for spec in method_specs(settings)}
    scoring = {"judge": "keyword", "metric": "exact_match", "batch_size": 32}
    assert options == {
        "recover": {**scoring, "max_new_tokens": 48},
        "retrain:kl": {"seed": 7, "epochs": 2},
        "retrain:sft,seed=3": {"seed": 3, "epochs": 2},  # its own option wins
    }
    with_seed = CompareSettings(methods=("retrain:kl",), retrain_options="seed=1", seed=7)
    assert method_specs(with_seed)[0].options == {"seed": 1}
    # recover scores its checks as the rows are scored, unless its own options say otherwise
    short = CompareSettings(methods=("recover:max_new_tokens=8",), batch_size=4, device="cpu")
    assert method_specs(short)[0].options == {
        **scoring,
        "batch_size": 4,
        "max_new_tokens": 8,
        "device": "cpu",
    }

    seen = stop_at_evaluator(monkeypatch)
    inputs = CompareInputs(aligned=tmp_path, finetuned=tmp_path, harmful=["a prompt"])
    with pytest.raises(KeyboardInterrupt):
        compare_run.compare(inputs, settings, tmp_path / "out")
    assert (seen["seed"], seen["limit"]) == (7, 5)


def test_a_recover_row_where_no_repair_held_says_so_unscored(tmp_path):
    """recover exits without an output when no repair held: its row says so with what it
    reached, instead of B's scores as if it had worked; --resume reuses it."""
    aligned, finetuned, task = no_repair_case(tmp_path)
    spec = "recover:" + ",".join(f"{name}={value}" for name, value in NO_REPAIR.items())
    inputs = CompareInputs(aligned=aligned, finetuned=finetuned, harmful=HARMFUL, task=task)
    settings = CompareSettings(methods=(spec,), max_new_tokens=NO_REPAIR["max_new_tokens"])
    out = tmp_path / "cmp"
    result = compare_run.compare(inputs, settings, out)
    row = result.rows[-1]
    assert (row.name, row.status, row.scores, row.out) == (spec, "no repair held", None, None)
    assert "harmful rate" in row.reason and "utility" in row.reason
    assert not any((out / "models").iterdir())
    assert result.recommendation["method"] is None
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][-1]["status"] == "no repair held"
    assert report["rows"][-1]["reason"] == row.reason
    table_row = next(line for line in (out / "report.md").read_text().splitlines() if spec in line)
    assert "no repair held" in table_row and row.reason in table_row
    lines: list[str] = []
    compare_run.compare(inputs, settings.replace(resume=True), out, lines.append)
    assert f"[1/1] {spec}: reused ({out / 'runs' / (parse_method(spec).slug + '.json')})" in lines


def test_a_recover_row_short_of_its_target_is_scored_and_says_so(tmp_path, monkeypatch):
    """A kept state above recover's repair target is written and scored like any output; its
    row carries recover's one-line shortfall as the reason."""
    import safealign.recover.api as recover_api

    monkeypatch.setattr(recover_api, "repair_target", lambda guard, settings: -1.0)
    aligned, finetuned = make_pair(tmp_path)
    task = [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
    spec = "recover:schedule=paper,steps=2,rate=0.01"
    inputs = CompareInputs(aligned=aligned, finetuned=finetuned, harmful=HARMFUL, task=task)
    result = compare_run.compare(
        inputs, CompareSettings(methods=(spec,), max_new_tokens=6), tmp_path / "c"
    )
    row = result.rows[-1]
    assert (row.name, row.status) == (spec, "done") and row.scores is not None
    report = json.loads(
        (tmp_path / "c" / "models" / parse_method(spec).slug / "report.json").read_text()
    )
    assert row.reason == f"short of its target: {report['shortfall']}"


def test_table_shows_the_coherence_scores_and_reads_older_records_as_unscored(tmp_path):
    scored = _row("m1", 0.1, 0.9)
    scored.scores["safe_and_coherent_rate"] = {"value": 0.75, "n": 10, "ci95": [0.4, 0.9]}
    scored.scores["incoherent_rate"] = {
        "harmful": {"value": 0.15, "n": 10, "ci95": [0.0, 0.4]},
        "benign": {"value": 0.05, "n": 10, "ci95": [0.0, 0.3]},
    }
    older = _row("m2", 0.2, 0.8)  # a run record written before the coherence scores existed
    result = _result(tmp_path, [_row("aligned", 0.0, 0.0, kind="input"), scored, older])
    recommend(result, None)
    rows = {row["name"]: row for row in table_rows(result)}
    assert rows["m1"]["safe_and_coherent_rate"] == 0.75
    assert (rows["m1"]["incoherent_harmful"], rows["m1"]["incoherent_benign"]) == (0.15, 0.05)
    assert rows["m2"]["safe_and_coherent_rate"] is None and rows["m2"]["incoherent_harmful"] is None
    write_report(result)
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in (tmp_path / "report.md").read_text().splitlines()
        if line.startswith("| ")
    ]
    columns = table[0]
    assert columns[2:7] == [
        "harmful_rate",
        "safe_and_coherent_rate",
        "utility",
        "over_refusal",
        "incoherent_harmful",
    ]
    cells = {row[0]: dict(zip(columns, row, strict=True)) for row in table[1:]}
    assert cells["m1"]["safe_and_coherent_rate"] == "0.750"
    assert cells["m1"]["incoherent_benign"] == "0.050"
    assert cells["m2"]["incoherent_harmful"] == "-"


def test_resume_reuses_a_row_only_when_measured_as_the_run_would(tmp_path):
    """A stored row is reused when the method, inputs and score-changing settings match; a
    changed --limit, reply length or task file runs it again, a changed bound does not."""
    aligned, finetuned = make_pair(tmp_path)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": "5"}) + "\n" for p in TASK_PROMPTS))
    inputs = CompareInputs(aligned=aligned, finetuned=finetuned, harmful=HARMFUL, task=task)
    spec = "interpolate:alpha=0.5"
    settings = CompareSettings(methods=(spec,), max_new_tokens=4, batch_size=4)
    out = tmp_path / "cmp"
    compare_run.compare(inputs, settings, out)

    def status(given: CompareSettings) -> str:
        lines: list[str] = []
        compare_run.compare(inputs, given.replace(resume=True), out, lines.append)
        line = next(line for line in lines if line.startswith(f"[1/1] {spec}: r"))
        return line.split(": ")[1].split(" ")[0]

    assert status(settings) == "reused"
    assert status(settings.replace(max_harmful_rate=0.5, budget_minutes=60)) == "reused"
    assert status(settings.replace(limit=2)) == "running"
    assert status(settings.replace(limit=2)) == "reused"  # the rerun's row was stored
    assert status(settings.replace(max_new_tokens=5)) == "running"
    task.write_text(task.read_text().replace('"5"', '"6"'))
    assert status(settings.replace(max_new_tokens=5)) == "running"
    assert status(settings.replace(max_new_tokens=5)) == "reused"
