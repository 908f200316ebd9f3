"""The recovery loop at one rate.

Per step: add the gradient of -cos(harmful-prompt centroid, A's harmful direction) over the
blocks below the direction layer (gradients accumulate across steps), restore the top
``rate`` share of sign-agreeing elements to their aligned values, and score the step with the
guard. From the end of the warm-up on, a step the guard refuses is partly rolled back
(``rollback_rate`` of its restores, elements then blocked for good) and scored again. The kept
state is the last step that held; later steps are undone when the loop ends.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from safealign.recover.guard import StepGuard
from safealign.recover.ledger import Ledger
from safealign.recover.result import RunOutcome, StepRecord
from safealign.recover.sets import Sets
from safealign.recover.settings import RecoverSettings
from safealign.recover.working import WorkingModel


def run(
    work: WorkingModel,
    guard: StepGuard,
    sets: Sets,
    settings: RecoverSettings,
    rate: float,
    *,
    label: str,
    progress: bool = True,
) -> tuple[RunOutcome, Ledger]:
    """Run all steps at ``rate``; the model is left in the kept state."""
    start, k = time.perf_counter(), work.layout.per_step(rate)
    first_checked = min(max(settings.warmup, 1), settings.steps)
    ledger, records, kept = Ledger(), [], 0
    bar = tqdm(range(1, settings.steps + 1), desc=label, disable=not progress)
    with work.accumulating():
        try:
            for step in bar:
                checked = guard.checks and step >= first_checked
                record = _step(work, guard, ledger, sets, settings, step, k, checked)
                records.append(record)
                kept = step if record.holds or not guard.checks else kept
                bar.set_postfix(_postfix(record))
        finally:
            bar.close()
    work.reset(ledger.take(range(kept + 1, len(records) + 1)))
    last = records[kept - 1] if kept else None
    outcome = RunOutcome(
        rate=rate,
        steps=records,
        kept_step=kept,
        restored=ledger.net_total(kept),
        harmful_rate=last.harmful_rate if last else None,
        utility=last.utility if last else None,
        over_refusal=last.over_refusal if last else None,
        seconds=time.perf_counter() - start,
    )
    return outcome, ledger


def _step(
    work: WorkingModel,
    guard: StepGuard,
    ledger: Ledger,
    sets: Sets,
    settings: RecoverSettings,
    step: int,
    k: int,
    checked: bool,
) -> StepRecord:
    """One step: gradient, restore, score; a checked step that fails is partly rolled back."""
    start = time.perf_counter()
    loss = work.pull(sets.harmful.prompts, guard.direction, settings.batch_size)
    picked, offered = work.candidates(k, ledger)
    restored = work.restore(picked)
    ledger.record_restore(step, restored)
    check, before, rolled = guard.check(work), None, {}
    if checked and not check.holds and settings.rollback_rate > 0 and restored:
        rolled = work.roll_back(
            restored, guard.keep_sets, settings.rollback_rate, settings.batch_size
        )
        ledger.record_rollback(step, rolled)
        before, check = check.utility, guard.check(work)
    net = {n: i.numel() for n, i in restored.items()}
    for n, i in rolled.items():
        net[n] -= i.numel()
    return StepRecord(
        step=step,
        candidates=offered,
        restored=sum(i.numel() for i in restored.values()),
        rolled_back=sum(i.numel() for i in rolled.values()),
        restored_total=ledger.net_total(step),
        per_layer=work.layout.layer_counts(net),
        loss=loss,
        harmful_rate=check.harmful_rate,
        utility=check.utility if checked else None,
        utility_before_rollback=before,
        over_refusal=check.over_refusal if checked else None,
        holds=check.holds if checked else None,
        seconds=round(time.perf_counter() - start, 3),
    )


def _postfix(record: StepRecord) -> dict[str, str]:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return {
        "harmful": f"{record.harmful_rate:.2f}",
        "utility": show(record.utility),
        "refusal": show(record.over_refusal),
        "cos": f"{-record.loss:.3f}",
    }
