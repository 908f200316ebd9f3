"""The ``adaptive`` schedule: its attempts in order, the first repair ends the run, the best
held state is the one kept, the budget stops further attempts; a kept state above the repair
target exits 1."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from recover_support import HARMFUL, TASK_PROMPTS, make_pair, run_recover

import safealign.recover.adaptive as adaptive
from safealign.recover import RecoverSettings
from safealign.recover.api import open_pair
from safealign.recover.cli import recover_command
from safealign.recover.ledger import Ledger
from safealign.recover.result import RunOutcome
from safealign.recover.weights import layout, read
from safealign.recover.working import WorkingModel

ELEMENTS = 10  # restored by each scripted attempt, a range of its own


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    aligned, finetuned = make_pair(tmp_path_factory.mktemp("pair"))
    a, b = open_pair(aligned, finetuned)
    return WorkingModel(a, b, layout(b, None), torch.float32, None)


def _scripted(monkeypatch, script: list[tuple[int, float | None]]) -> list:
    """Replace the schedule run by one that, at its i-th call, sets elements [10i, 10i+10) of
    the first restorable tensor to A's values and keeps them when ``script[i]`` keeps a step
    (with that harmful rate), else undoes them. Returns the settings each call got."""
    calls: list[RecoverSettings] = []

    def run(work, guard, sets, given, rate, *, label, progress, deadline=None):
        number = len(calls)
        calls.append(given)
        kept, harmful = script[number]
        name = next(iter(work.params))
        index = torch.arange(number * ELEMENTS, (number + 1) * ELEMENTS)
        values = read(work.aligned, name, torch.float32).reshape(-1)[index]
        work._write({name: (index, values)})
        ledger = Ledger()
        ledger.record_restore(1, {name: index})
        if not kept:
            work.reset(ledger.take([1]))
        outcome = RunOutcome(rate, [], kept, kept * ELEMENTS, harmful, 1.0, 0.0, 0.0)
        return outcome, ledger

    monkeypatch.setattr(adaptive, "run", run)
    return calls


def _guard(aligned_harmful: float):
    return SimpleNamespace(references={"aligned": {"harmful_rate": aligned_harmful}})


def test_attempts_follow_the_ladder_and_the_first_repair_ends_the_run(work, monkeypatch):
    calls = _scripted(monkeypatch, [(0, None), (1, 0.05), (1, 0.0)])
    settings = RecoverSettings(rate=0.004, steps=10, rollback_rate=0.2)
    outcome, tried = adaptive.run_adaptive(
        work, _guard(0.0), None, settings, deadline=None, progress=False
    )
    # paper at the run's settings, then guarded: the second repairs (0.05 <= 0 + 0.1)
    assert [(c.schedule, c.rate, c.steps, c.rollback_rate) for c in calls] == [
        ("paper", 0.004, 10, 0.2),
        ("guarded", 0.004, 10, 0.2),
    ]
    assert [c.warmup for c in calls] == [5, 1]  # each schedule's own (4 layers: guarded 1)
    assert [t["verdict"] for t in tried] == ["nothing held", "repaired"]
    assert [t["kept"] for t in tried] == [False, True] and outcome.harmful_rate == 0.05
    name = next(iter(work.params))
    assert adaptive.changed_elements(work)[name].tolist() == list(range(ELEMENTS, 2 * ELEMENTS))
    work.reset(adaptive.changed_elements(work))


def test_without_a_repair_the_best_held_state_is_kept_exactly(work, monkeypatch):
    calls = _scripted(monkeypatch, [(1, 0.3), (0, None), (1, 0.5)])
    settings = RecoverSettings(rate=0.004, steps=10, rollback_rate=0.2, harmful_margin=0.1)
    outcome, tried = adaptive.run_adaptive(
        work, _guard(0.1), None, settings, deadline=None, progress=False
    )
    last = calls[-1]
    assert (last.schedule, last.rate, last.steps, last.rollback_rate) == (
        "guarded",
        0.002,
        20,
        0.5,
    )
    assert [t["verdict"] for t in tried] == [
        "held, harmful rate above the target",
        "nothing held",
        "held, harmful rate above the target",
    ]
    assert [t["kept"] for t in tried] == [True, False, False] and outcome.harmful_rate == 0.3
    # the model holds attempt 1's state: its elements at A's values, every other at B's
    name = next(iter(work.params))
    assert list(adaptive.changed_elements(work)) == [name]
    assert adaptive.changed_elements(work)[name].tolist() == list(range(ELEMENTS))
    work.reset(adaptive.changed_elements(work))
    assert adaptive.changed_elements(work) == {}


def test_no_attempt_starts_after_the_deadline(work, monkeypatch):
    calls = _scripted(monkeypatch, [(0, None)] * 3)
    outcome, tried = adaptive.run_adaptive(
        work, _guard(0.0), None, RecoverSettings(), deadline=0.0, progress=False
    )
    assert len(calls) == 1 and outcome.kept_step == 0
    assert [t["verdict"] for t in tried] == ["nothing held", "skipped", "skipped"]
    assert adaptive.changed_elements(work) == {}


@pytest.mark.parametrize("schedule, in_time", [("guarded", 3), ("paper", 2)])
def test_a_spent_budget_stops_the_running_attempt_at_a_step_boundary(
    tmp_path, monkeypatch, schedule, in_time
):
    """Once --max-minutes is spent no further step starts: the run ends after the steps begun
    before it, keeping the last state that held by then, exactly as a run of that many steps
    would. The budget is simulated: it runs out at the deadline check before step 4 (paper's
    warm-up step is not checked against it, so its check before step 4 is its third)."""
    from safealign.recover import record

    aligned, finetuned = make_pair(tmp_path)
    task = [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
    common = {"harmful": HARMFUL, "task": task, "rate": 0.01, "max_new_tokens": 6}
    common |= {"schedule": schedule, "warmup": 1, "check_every": 1, "metric_drop": 0.99}
    short = run_recover(aligned, finetuned, tmp_path / "short", steps=3, **common)
    checks = iter(range(100))
    monkeypatch.setattr(record.StepContext, "past_deadline", lambda self: next(checks) >= in_time)
    cut = run_recover(aligned, finetuned, tmp_path / "cut", steps=8, max_minutes=1.0, **common)
    assert [s.step for s in cut.run.steps] == [s.step for s in short.run.steps] == [1, 2, 3]
    assert cut.run.kept_step == short.run.kept_step == 3  # metric_drop 0.99: every check holds
    from safetensors.torch import load_file

    a = load_file(tmp_path / "short" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_adaptive_output_is_the_paper_run_when_paper_repairs(tmp_path):
    """The first attempt is the authors' loop (here with fewer direction prompts than a step
    window, so every step takes them all, as ``--schedule paper``): where it repairs, adaptive
    writes the same tensors and stops there."""
    aligned, finetuned = make_pair(tmp_path)
    task = [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
    common = {"harmful": HARMFUL, "task": task, "rate": 0.01, "steps": 2, "max_new_tokens": 6}
    common["harmful_margin"] = 1.0  # any kept state repairs
    paper = run_recover(aligned, finetuned, tmp_path / "paper", schedule="paper", **common)
    auto = run_recover(aligned, finetuned, tmp_path / "auto", **common)
    assert len(HARMFUL) <= auto.attempts[0]["step_prompts"]
    assert auto.settings.schedule == "adaptive" and len(auto.attempts) == 1
    assert auto.attempts[0]["verdict"] == "repaired" and auto.attempts[0]["kept"]
    assert auto.run.kept_step == paper.run.kept_step > 0
    from safetensors.torch import load_file

    p = load_file(tmp_path / "paper" / "model.safetensors")
    c = load_file(tmp_path / "auto" / "model.safetensors")
    assert p.keys() == c.keys() and all(torch.equal(p[n], c[n]) for n in p)
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["attempts"][0]["schedule"] == "paper" and report["shortfall"] is None


def test_a_kept_state_above_the_target_is_written_and_exits_1(tmp_path, monkeypatch):
    import safealign.recover.api as api

    monkeypatch.setattr(api, "repair_target", lambda guard, settings: -1.0)
    aligned, finetuned = make_pair(tmp_path)
    harmful = tmp_path / "h.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    out = tmp_path / "out"
    args = ["--aligned", str(aligned), "--finetuned", str(finetuned), "--harmful", str(harmful)]
    args += ["--no-utility-check", "--schedule", "paper", "--steps", "2", "--rate", "0.01"]
    result = CliRunner().invoke(recover_command, [*args, "--max-new-tokens", "6", "--out", out])
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["shortfall"].startswith("the kept state (step 2) is ")
    assert (
        result.stderr.splitlines()[-1] == f"repair incomplete: {report['shortfall']}; wrote {out}"
    )
    assert "**Not a full repair**" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "max_cost, max_minutes, deadline",
    [(8.0, None, 114.0), (8.0, 0.05, 103.0), (0.0, 0.05, 103.0), (0.0, None, None), (1, None, 100)],
)
def test_the_budget_is_the_earlier_of_minutes_and_evaluations_of_b(max_cost, max_minutes, deadline):
    """--max-cost counts evaluations of B (here 2 s each) and keeps one for scoring the kept
    state; with --max-minutes too, the earlier deadline holds; 0 lifts --max-cost."""
    from safealign.recover.api import _deadline

    settings = RecoverSettings(max_cost=max_cost, max_minutes=max_minutes)
    assert _deadline(100.0, settings, 2.0) == deadline


@pytest.mark.filterwarnings("ignore:no task data given")
@pytest.mark.parametrize(
    "schedule, max_cost", [("adaptive", 8.0), ("paper", 0.0), ("guarded", 0.0)]
)
def test_only_adaptive_has_a_cost_budget_by_default(tmp_path, schedule, max_cost):
    """paper stays the authors' loop, run to its end; adaptive's ladder is bounded by default."""
    aligned, finetuned = make_pair(tmp_path)
    planned = run_recover(
        aligned, finetuned, None, harmful=HARMFUL, schedule=schedule, dry_run=True
    )
    assert planned.settings.max_cost == max_cost


def test_attempts_the_budget_stopped_are_named_in_the_shortfall(work, monkeypatch):
    """A run whose budget is spent after its first attempt says which attempts did not start."""
    import safealign.recover.api as api

    _scripted(monkeypatch, [(1, 0.9)] * 3)
    outcome, tried = adaptive.run_adaptive(
        work, _guard(0.0), None, RecoverSettings(), deadline=0.0, progress=False
    )
    work.reset(adaptive.changed_elements(work))  # the next test starts from B
    settings = RecoverSettings(max_cost=8.0, max_minutes=10)
    line = api._unstarted(tried, settings)
    assert (
        line
        == "; attempt 2, 3 not started: the budget (--max-cost 8 or --max-minutes 10) was spent"
    )
    assert api._unstarted(tried[:1], settings) == ""


@pytest.mark.parametrize("deadline, started", [(15.0, 1), (25.0, 2), (35.0, 3), (None, 3)])
def test_an_attempt_starts_only_when_the_budget_left_covers_the_previous_one(
    work, monkeypatch, deadline, started
):
    """Each scripted attempt takes 10 s of a simulated clock; with the deadline at 15 s the
    second (which would end at 20 s) is not begun, at 25 s the third is not."""
    clock = [0.0]
    calls = _scripted(monkeypatch, [(1, 0.9)] * 3)
    scripted = adaptive.run

    def timed(*args, **kwargs):
        clock[0] += 10.0
        return scripted(*args, **kwargs)

    monkeypatch.setattr(adaptive, "run", timed)
    monkeypatch.setattr(adaptive, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    _, tried = adaptive.run_adaptive(
        work, _guard(0.0), None, RecoverSettings(), deadline=deadline, progress=False
    )
    work.reset(adaptive.changed_elements(work))  # the next test starts from B
    assert len(calls) == started
    assert [t["verdict"] for t in tried].count("skipped") == 3 - started


def test_a_step_starts_only_when_the_budget_left_covers_the_longest_step(monkeypatch):
    """Steps start at 0, 30, 50 and 75 s of a simulated clock with the deadline at 100 s: the
    fourth would end past it (the longest step took 30 s), so it does not start."""
    from safealign.recover import record

    times = iter([0.0, 30.0, 50.0, 75.0])
    monkeypatch.setattr(record, "time", SimpleNamespace(perf_counter=lambda: next(times)))
    ctx = record.StepContext(None, None, None, RecoverSettings(), 1, deadline=100.0)
    assert [ctx.past_deadline() for _ in range(4)] == [False, False, False, True]
    assert ctx.longest_step == 30.0


def test_the_cost_budget_never_cuts_the_first_attempt(work, monkeypatch):
    """The first attempt is the authors' loop, run as they run it: a spent --max-cost budget
    (``ladder_deadline``) stops only the attempts after it."""
    calls = _scripted(monkeypatch, [(1, 0.9)] * 3)
    _, tried = adaptive.run_adaptive(
        work,
        _guard(0.0),
        None,
        RecoverSettings(),
        deadline=None,
        ladder_deadline=0.0,
        progress=False,
    )
    work.reset(adaptive.changed_elements(work))  # the next test starts from B
    assert len(calls) == 1 and tried[0]["verdict"] == "held, harmful rate above the target"
    assert [t["verdict"] for t in tried[1:]] == ["skipped", "skipped"]
