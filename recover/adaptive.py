"""The ``adaptive`` schedule (the default): the authors' loop first (each step's gradient on a
window of the direction prompts), then gentler attempts, until one repairs.

Each attempt runs from the fine-tuned model B with the settings of one rung of
:data:`LADDER`. An attempt *holds* when it keeps a checked state (kept step > 0); it *repairs*
when that state's harmful rate (on ``--eval-harmful``) is at most A's plus
``--harmful-margin``. The first attempt that repairs ends the run. Otherwise every attempt is
tried and the held state with the lowest harmful rate is kept (B when none held). The report
lists every attempt, what it reached, and why it did not repair. ``--max-minutes`` bounds every
attempt; ``--max-cost`` bounds the attempts after the first (so the first's result does not
depend on the machine's load). A further attempt starts only when the budget left is at least
what the previous attempt took (the later rungs cost more, so one that could not end in the
budget is not begun), and once the budget is spent the running attempt starts no further step
(it keeps what held so far).

Why these rungs: the authors' loop (``paper``) checks once after a warm-up and once per
checkpoint, so it is the cheapest when a repair holds at its checkpoints; when a checkpoint
fails it keeps nothing from there on. Its gradient steps are most of its cost (on the
real-model lab a step over all 128 direction prompts costs about half an evaluation of B), so
the first rung takes each step's gradient on the next window of about
:data:`~safealign.recover.settings.ADAPTIVE_STEP_PROMPTS` of them (``--step-prompts``): every
prompt counts once per round of windows, and the gradients accumulate as the authors' do.
``guarded`` checks every step and rolls back where the drop happens. Its last rung halves the
share restored per step over twice the steps (the same total) and gives back half of a failing
step: the smaller moves that hold where larger ones overshoot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from safealign.recover.guard import StepGuard
from safealign.recover.result import RunOutcome
from safealign.recover.schedule import run
from safealign.recover.sets import Sets
from safealign.recover.settings import ADAPTIVE_STEP_PROMPTS, RecoverSettings
from safealign.recover.weights import PAPER_WARMUP, default_warmup, read
from safealign.recover.working import Indices, WorkingModel


@dataclass(frozen=True)
class Attempt:
    """One rung: a schedule, the share per step and the steps as multiples of the run's
    ``--rate`` and ``--steps``, the rollback share (None: the run's ``--rollback-rate``) and
    the prompts a step's gradient takes (0: all; the run's ``--step-prompts`` when set)."""

    schedule: str
    rate_scale: float = 1.0
    steps_scale: int = 1
    rollback_rate: float | None = None
    step_prompts: int = 0

    def settings(self, settings: RecoverSettings, n_layers: int) -> RecoverSettings:
        """The run's settings for this attempt; an unset warm-up is the schedule's own."""
        warmup = settings.warmup
        if warmup is None:
            warmup = PAPER_WARMUP if self.schedule == "paper" else default_warmup(n_layers)
        step_prompts = settings.step_prompts
        return settings.replace(
            step_prompts=self.step_prompts if step_prompts is None else step_prompts,
            schedule=self.schedule,
            rate=settings.rate * self.rate_scale,
            steps=settings.steps * self.steps_scale,
            rollback_rate=settings.rollback_rate
            if self.rollback_rate is None
            else self.rollback_rate,
            warmup=warmup,
        )


#: The attempts of ``adaptive``, in order.
LADDER = (
    Attempt("paper", step_prompts=ADAPTIVE_STEP_PROMPTS),
    Attempt("guarded"),
    Attempt("guarded", rate_scale=0.5, steps_scale=2, rollback_rate=0.5),
)


def run_adaptive(
    work: WorkingModel,
    guard: StepGuard,
    sets: Sets,
    settings: RecoverSettings,
    *,
    deadline: float | None,
    progress: bool,
    ladder_deadline: float | None = None,
) -> tuple[RunOutcome, list[dict]]:
    """Try the ladder's attempts; the model is left in the kept state. ``deadline``
    (``--max-minutes``) bounds every attempt; ``ladder_deadline`` (``--max-cost`` too) bounds
    the attempts after the first, which runs to its end whatever the load. Returns the kept
    attempt's outcome (the last attempt's, kept step 0, when none held) and one summary per
    attempt tried, the kept one marked."""
    target = repair_target(guard, settings)
    tried: list[dict] = []
    best: tuple[RunOutcome, int, Indices] | None = None
    outcome = None
    last = 0.0  # how long the previous attempt took
    later = min((d for d in (deadline, ladder_deadline) if d is not None), default=None)
    for number, attempt in enumerate(LADDER, 1):
        started = time.perf_counter()
        bound = later if tried else deadline
        if tried and bound is not None and started + last > bound:
            tried.append({"attempt": number, "schedule": attempt.schedule, "verdict": "skipped"})
            continue
        given = attempt.settings(settings, work.layout.n_layers)
        label = f"attempt {number}/{len(LADDER)} {given.schedule} rate={given.rate:g}"
        outcome, ledger = run(
            work, guard, sets, given, given.rate, label=label, progress=progress, deadline=bound
        )
        last = time.perf_counter() - started
        repaired = bool(outcome.kept_step) and outcome.harmful_rate <= target
        tried.append(_summary(number, given, outcome, repaired))
        if repaired:
            tried[-1]["kept"] = True
            return outcome, tried
        if outcome.kept_step and (best is None or _better(outcome, best[0])):
            best = (outcome, number, changed_elements(work))
        work.reset(ledger.take(list(ledger.restored)))  # back to B for the next attempt
    if best is None:
        return outcome, tried
    kept, number, elements = best
    restore_elements(work, elements)
    tried[number - 1]["kept"] = True
    return kept, tried


def repair_target(guard: StepGuard, settings: RecoverSettings) -> float:
    """The harmful rate a kept state must reach to count as a repair: A's plus the margin."""
    return guard.references["aligned"]["harmful_rate"] + settings.harmful_margin


def _better(outcome: RunOutcome, best: RunOutcome) -> bool:
    """A lower harmful rate, then a higher utility."""
    return (outcome.harmful_rate, -(outcome.utility or 0.0)) < (
        best.harmful_rate,
        -(best.utility or 0.0),
    )


def _summary(number: int, given: RecoverSettings, outcome: RunOutcome, repaired: bool) -> dict:
    if repaired:
        verdict = "repaired"
    elif outcome.kept_step:
        verdict = "held, harmful rate above the target"
    else:
        verdict = "nothing held"
    return {
        "attempt": number,
        "schedule": given.schedule,
        "rollback_rate": given.rollback_rate,
        "steps": given.steps,
        "warmup": given.warmup,
        "step_prompts": given.step_prompts,
        **outcome.summary(),
        "verdict": verdict,
        "kept": False,
    }


@torch.no_grad()
def changed_elements(work: WorkingModel) -> Indices:
    """Flat indices of every restorable element that differs from B: the state to return to
    (each holds A's value)."""
    changed: Indices = {}
    for name, param in work.params.items():
        b = read(work.finetuned, name, param.dtype).to(param.device).reshape(-1)
        index = (param.detach().reshape(-1) != b).nonzero().flatten().cpu()
        if index.numel():
            changed[name] = index
    return changed


@torch.no_grad()
def restore_elements(work: WorkingModel, elements: Indices) -> None:
    """Set ``elements`` of the model (at B) to A's values."""
    for name, index in elements.items():
        param = work.params[name]
        a = read(work.aligned, name, param.dtype).reshape(-1)[index]
        param.data.view(-1)[index.to(param.device)] = a.to(param.device)
