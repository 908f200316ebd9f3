"""The recovery loop at one rate: the chosen schedule's steps, then the kept state.

Each schedule (``guarded``: :mod:`safealign.recover.loop`; ``paper``:
:mod:`safealign.recover.paper`) takes the same arguments and returns its step records, the
kept step and the ledger of what it restored; :func:`run` gives it fp32 gradient sums, undoes
every step after the kept one, scores the kept state's harmful rate and reports the outcome.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from safealign.recover.guard import StepGuard
from safealign.recover.ledger import Ledger
from safealign.recover.loop import guarded_steps
from safealign.recover.paper import paper_steps
from safealign.recover.record import StepContext, outcome
from safealign.recover.result import RunOutcome
from safealign.recover.sets import Sets
from safealign.recover.settings import RecoverSettings
from safealign.recover.working import WorkingModel

#: The steps of each ``schedule``.
SCHEDULES = {"guarded": guarded_steps, "paper": paper_steps}


def run(
    work: WorkingModel,
    guard: StepGuard,
    sets: Sets,
    settings: RecoverSettings,
    rate: float,
    *,
    label: str,
    progress: bool = True,
    deadline: float | None = None,
) -> tuple[RunOutcome, Ledger]:
    """Run the schedule at ``rate`` (no step starting after ``deadline``); the model is left
    in the kept state."""
    start, k = time.perf_counter(), work.layout.per_step(rate)
    bar = tqdm(total=settings.steps, desc=label, disable=not progress)
    with work.accumulating():
        try:
            context = StepContext(work, guard, sets, settings, k, deadline)
            records, kept, ledger = SCHEDULES[settings.schedule](context, bar)
        finally:
            bar.close()
    work.reset(ledger.take([s for s in list(ledger.restored) if s > kept]))
    harmful_rate = guard.harmful_rate(work) if kept else None  # kept 0: B, scored already
    return outcome(rate, records, kept, ledger, start, harmful_rate), ledger
