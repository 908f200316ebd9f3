"""``--step-prompts``: each step's harmful gradient on a window of the direction prompts,
the windows taken in turn; adaptive's first attempt takes windows, ``paper`` and ``guarded``
take every prompt unless asked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from recover_support import HARMFUL, TASK_PROMPTS, make_pair, run_recover

from safealign.recover import RecoverSettings
from safealign.recover.adaptive import LADDER
from safealign.recover.record import StepContext
from safealign.recover.settings import ADAPTIVE_STEP_PROMPTS
from safealign.recover.working import WorkingModel

PROMPTS = [f"prompt {i}" for i in range(7)]


def _context(step_prompts: int) -> StepContext:
    sets = SimpleNamespace(harmful=SimpleNamespace(prompts=PROMPTS))
    settings = RecoverSettings(step_prompts=step_prompts)
    return StepContext(None, None, sets, settings, k=1)


@pytest.mark.parametrize(
    ("size", "windows"),
    [
        (0, [PROMPTS]),
        (7, [PROMPTS]),
        (50, [PROMPTS]),
        (3, [PROMPTS[0::3], PROMPTS[1::3], PROMPTS[2::3]]),  # ceil(7/3) = 3 windows
        (4, [PROMPTS[0::2], PROMPTS[1::2]]),
        (1, [[p] for p in PROMPTS]),
    ],
)
def test_windows_cover_every_prompt_once_and_are_taken_in_turn(size, windows):
    """Window w holds every W-th prompt from the w-th, so each spans the whole list."""
    context = _context(size)
    taken = [list(context.step_prompts(step)) for step in range(1, 2 * len(windows) + 1)]
    assert taken == windows + windows


@pytest.mark.parametrize(
    ("schedule", "given", "first", "later"),
    [
        ("adaptive", None, ADAPTIVE_STEP_PROMPTS, 0),
        ("adaptive", 0, 0, 0),
        ("adaptive", 5, 5, 5),
    ],
)
def test_adaptive_gives_its_first_attempt_windows_unless_told(schedule, given, first, later):
    settings = RecoverSettings(schedule=schedule, step_prompts=given)
    resolved = [attempt.settings(settings, n_layers=4).step_prompts for attempt in LADDER]
    assert resolved == [first] + [later] * (len(LADDER) - 1)


def _pulled(monkeypatch) -> list[list[str]]:
    """Record the prompts of every gradient pass recover makes."""
    pulled: list[list[str]] = []
    pull = WorkingModel.pull

    def recording(self, prompts, target, batch_size):
        pulled.append(list(prompts))
        return pull(self, prompts, target, batch_size)

    monkeypatch.setattr(WorkingModel, "pull", recording)
    return pulled


def _recover(root, **settings):
    """recover on a fresh random pair with the test's harmful prompts, small and fast."""
    aligned, finetuned = make_pair(root)
    return run_recover(
        aligned, finetuned, root / "out", harmful=HARMFUL, rate=0.01, max_new_tokens=4, **settings
    )


@pytest.mark.parametrize(
    ("schedule", "step_prompts", "expected"),
    [
        ("paper", None, [HARMFUL] * 3),  # the authors' loop: every prompt, every step
        ("guarded", None, [HARMFUL] * 3),
        ("paper", 2, [HARMFUL[0::3], HARMFUL[1::3], HARMFUL[2::3]]),
        ("guarded", 3, [HARMFUL[0::2], HARMFUL[1::2], HARMFUL[0::2]]),
    ],
)
def test_each_step_pulls_its_window(tmp_path, monkeypatch, schedule, step_prompts, expected):
    pulled = _pulled(monkeypatch)
    result = _recover(tmp_path, schedule=schedule, step_prompts=step_prompts, steps=3, warmup=0)
    assert pulled == expected
    assert result.settings.step_prompts == (step_prompts or 0)


def test_adaptive_records_each_attempts_step_prompts(tmp_path, monkeypatch):
    pulled = _pulled(monkeypatch)
    task = [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
    # harmful_margin 1: the first kept state repairs, so one attempt
    result = _recover(
        tmp_path, task=task, step_prompts=4, steps=2, warmup=1, check_every=1, harmful_margin=1.0
    )
    assert [a["step_prompts"] for a in result.attempts] == [4]
    # ceil(6/4) = 2 windows of 3; no rollback when the warm-up holds, so two gradient passes
    assert pulled[:2] == [HARMFUL[0::2], HARMFUL[1::2]]
