"""The ``guarded`` schedule: every step checked.

Per step: add the gradient of -cos(harmful-prompt centroid, A's harmful direction) over the
restorable tensors, restore the top ``rate`` share of sign-agreeing elements to their aligned
values, and check the step with the guard once the warm-up is over. Its rules, and why each
differs from the authors' schedule (``paper``, :mod:`safealign.recover.paper`):

- **Every step is checked from the end of the warm-up** (1 step under 12 layers, else 5), and
  a step that fails is rolled back where it happens. Rollback only gives back the failing
  step's elements, so whatever an unchecked stretch overshoots would stay; checking each step
  catches a drop at the step that caused it instead of restarting the whole run.
- **Rollback gives back ``rollback_rate`` of all the step's restores** (the largest
  |gradient| toward B's centroids on the task training prompts, and benign prompts when
  given, among those a descent step moves toward B), then the step is scored again. A share
  of the whole step, not of the elements the rollback gradient happens to favour, makes each
  rollback a known fraction of what the step did.
- **Rolled-back elements are blocked for good.** The harmful-direction gradient keeps
  accumulating, so an element given back would rank as high the next step and be restored
  again, undoing the rollback; blocking it makes every rollback final.
- **Harmful gradients accumulate across all steps** (the rollback's gradient is gathered
  apart and never enters the sum): summing steps averages out batch noise, as the reference
  does before its restart.
- **The kept state is the last step that held** (after its rollback, if any); later steps
  are undone when the loop ends (early, when the budget is spent). A step that still
  fails after its rollback is not kept, but a later step that holds is, with what the failed
  step left in place: every kept state is one the guard scored.
"""

from __future__ import annotations

import time
from dataclasses import replace

from tqdm.auto import tqdm

from safealign.recover.ledger import Ledger
from safealign.recover.record import StepContext, postfix, step_record
from safealign.recover.result import StepRecord


def guarded_steps(ctx: StepContext, bar: tqdm) -> tuple[list[StepRecord], int, Ledger]:
    """All steps, each checked from the warm-up's end: (records, kept step, ledger)."""
    guard, settings = ctx.guard, ctx.settings
    first_checked = min(max(settings.warmup, 1), settings.steps)
    ledger, records, kept = Ledger(), [], 0
    for step in range(1, settings.steps + 1):
        if ctx.past_deadline():
            break  # the budget is spent: the last step that held is kept
        checked = guard.checks and step >= first_checked
        record = _step(ctx, ledger, step, checked)
        records.append(record)
        kept = step if record.holds or not guard.checks else kept
        bar.update()
        bar.set_postfix(postfix(record))
    return records, kept, ledger


def _step(ctx: StepContext, ledger: Ledger, step: int, checked: bool) -> StepRecord:
    """One step: gradient, restore, score; a checked step that fails is partly rolled back."""
    work, guard, settings, k = ctx.work, ctx.guard, ctx.settings, ctx.k
    start = time.perf_counter()
    loss = work.pull(ctx.step_prompts(step), guard.direction, settings.grad_batch_size)
    picked, offered = work.candidates(k, ledger)
    restored = work.restore(picked)
    ledger.record_restore(step, restored)
    check, before, rolled = guard.check(work) if checked else None, None, {}
    if check is not None and not check.holds and settings.rollback_rate > 0 and restored:
        rolled = work.roll_back(
            restored, guard.keep_sets, settings.rollback_rate, settings.grad_batch_size
        )
        ledger.record_rollback(step, rolled)
        before, check = check.utility, guard.check(work)
    record = step_record(work, ledger, step, offered, restored, rolled, loss, check, start)
    return replace(record, utility_before_rollback=before)
