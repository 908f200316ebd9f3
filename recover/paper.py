"""The ``paper`` schedule: the recovery loop as the authors' code runs it
(kangyangWHU/LLMAlignment, ``sgdg_rollback_final.py``), read from their repository.

1. **Warm-up**: ``warmup`` steps (5, whatever the model's size), each adding the
   harmful-direction gradient to a running sum and restoring the top ``rate`` share of
   sign-agreeing elements by |summed gradient|.
2. **One check** of utility (and over-refusal, with benign prompts; the reference has no
   such guard) after the warm-up.
3. If it holds, the steps go on from there, gradients still accumulating. If it fails, the
   run **restarts from B** and every step, from step 1, is followed by a rollback: the
   summed gradients are zeroed (so each step's harmful gradient is its own), a fresh gradient
   of -cos(centroid, B's centroid) on the task *training* prompts (and on the benign
   prompts, with the over-refusal guard) is taken, and
   ceil(``rollback_rate`` x the step's restored elements that this gradient moves toward B)
   of those, the largest |gradient| first, get B's values back. Rolled-back elements are not
   blocked: a later step may restore them again.
4. **Checkpoints** every ``check_every`` steps (and the warm-up's, when it held) are checked
   in order; the kept state is the last checkpoint before the first one that fails (B itself
   when the first fails, the last checkpoint when none does). Steps after the first failing
   checkpoint, or after the last checkpoint, change nothing kept and are not run. Without
   task data or benign prompts nothing is checked and all ``steps`` are kept. (Ours: once
   a budget, ``--max-minutes`` or ``--max-cost``, is spent no step after the warm-up starts,
   and the last checkpoint that held is kept. With ``--step-prompts`` N > 0, as in
   ``adaptive``'s first attempt, each step's harmful gradient takes one window of the prompts
   in turn: :meth:`~safealign.recover.record.StepContext.step_prompts`; under ``paper`` it is
   0, every prompt, as the reference.)

Deliberate differences from the reference, none of which changes the method: exact top-k
counts (the reference takes |g| strictly above the k-th value: k-1 elements, fewer on ties);
one pass over each prompt list (the reference zips harmful and task loaders, so the shorter
one caps both); one holds-rule, utility >= floor, for the warm-up check and the checkpoints
(the reference fails the warm-up on < and a checkpoint on <=); steps after the first failing
checkpoint are not run (the reference runs them, then discards them).
"""

from __future__ import annotations

import time
from dataclasses import replace

from tqdm.auto import tqdm

from safealign.recover.guard import Check, StepGuard
from safealign.recover.ledger import Ledger
from safealign.recover.record import StepContext, postfix, step_record
from safealign.recover.result import StepRecord
from safealign.recover.settings import RecoverSettings
from safealign.recover.working import WorkingModel


def paper_steps(ctx: StepContext, bar: tqdm) -> tuple[list[StepRecord], int, Ledger]:
    """The warm-up, its check, then the steps (restarted with rollback if it failed) up to
    the first failing checkpoint: (records, kept step, ledger of the last pass)."""
    work, guard, settings = ctx.work, ctx.guard, ctx.settings
    warmup = min(settings.warmup, settings.steps)
    ledger, records = Ledger(), []
    for step in range(1, warmup + 1):
        records.append(_step(ctx, ledger, step, False, "warm-up"))
        bar.update()
    restart, kept, stop = _warmup_check(work, guard, settings, records, warmup)
    if restart:
        work.reset(ledger.take(range(1, warmup + 1)))
        ledger = Ledger()
    first = 1 if restart else warmup + 1
    last = settings.steps
    if guard.checks:
        last = 0 if stop else _last_checkpoint(settings, 0 if restart else warmup)
    for step in range(first, last + 1):
        if ctx.past_deadline():
            break  # the budget is spent: the last checkpoint that held is kept
        record = _step(ctx, ledger, step, restart)
        records.append(record)
        bar.update()
        bar.set_postfix(postfix(record))
        if record.holds is False:
            break
        if step % settings.check_every == 0 or not guard.checks:
            kept = step  # a checkpoint that held (without checks, every step holds)
    if not guard.checks and records:
        records[-1] = _checked(records[-1], guard.check(work))  # holds: nothing to check
    return records, kept, ledger


def _warmup_check(
    work: WorkingModel,
    guard: StepGuard,
    settings: RecoverSettings,
    records: list[StepRecord],
    warmup: int,
) -> tuple[bool, int, bool]:
    """(restart, kept, stop) after the warm-up: a failed check restarts with rollback (or,
    with ``rollback_rate`` 0, stops there with nothing kept)."""
    if not warmup:
        return False, 0, False
    if not guard.checks:
        return False, warmup, False
    check = guard.check(work)
    records[-1] = _checked(records[-1], check)
    if check.holds:
        return False, warmup, False
    restart = settings.rollback_rate > 0
    return restart, 0, not restart


def _last_checkpoint(settings: RecoverSettings, warmup: int) -> int:
    """The last checkpointed step: the last multiple of ``check_every``, or the warm-up's."""
    return max(warmup, settings.steps // settings.check_every * settings.check_every)


def _step(
    ctx: StepContext, ledger: Ledger, step: int, rollback: bool, phase: str | None = None
) -> StepRecord:
    """One step: restore (from a fresh gradient when rolling back), roll back, and check at a
    checkpoint (``phase`` "warm-up": never checked here)."""
    work, guard, settings, k = ctx.work, ctx.guard, ctx.settings, ctx.k
    phase = phase or ("restart" if rollback else "steps")
    start = time.perf_counter()
    if rollback:
        work.zero_grad()
    loss = work.pull(ctx.step_prompts(step), guard.direction, settings.grad_batch_size)
    picked, offered = work.candidates(k, None)
    restored = work.restore(picked)
    ledger.record_restore(step, restored)
    rolled = {}
    if rollback and restored:
        rolled = work.roll_back(
            restored,
            guard.keep_sets,
            settings.rollback_rate,
            settings.grad_batch_size,
            of_agreeing=True,
        )
        ledger.record_rollback(step, rolled)
    checked = phase != "warm-up" and guard.checks and step % settings.check_every == 0
    check = guard.check(work) if checked else None
    return step_record(work, ledger, step, offered, restored, rolled, loss, check, start, phase)


def _checked(record: StepRecord, check: Check) -> StepRecord:
    """``record`` with the scores of the check made after it."""
    return replace(
        record,
        utility=check.utility,
        over_refusal=check.over_refusal,
        drift=check.drift,
        holds=check.holds,
    )
