"""What a step and a run report: shared by every schedule."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from safealign.recover.guard import Check, StepGuard
from safealign.recover.ledger import Ledger
from safealign.recover.result import RunOutcome, StepRecord
from safealign.recover.sets import Sets
from safealign.recover.settings import RecoverSettings
from safealign.recover.working import Indices, WorkingModel


@dataclass
class StepContext:
    """What every step of a schedule works with: the model, the guard, the prompt sets, the
    settings, ``k``, the elements restored per step, and the run's ``deadline`` (a
    ``time.perf_counter()`` value; None: no limit)."""

    work: WorkingModel
    guard: StepGuard
    sets: Sets
    settings: RecoverSettings
    k: int
    deadline: float | None = None
    #: the longest time between two step starts so far (a step and its check)
    longest_step: float = 0.0
    _last_start: float | None = field(default=None, repr=False)

    def step_prompts(self, step: int) -> Sequence[str]:
        """The harmful prompts step ``step`` (from 1) takes its gradient on: all of them, or
        under ``--step-prompts`` N one of W = ceil(n / N) windows in turn, window w holding
        every W-th prompt from the w-th (so each spans the whole list, however it is ordered,
        and every prompt counts once in any W steps in a row)."""
        prompts, size = self.sets.harmful.prompts, self.settings.step_prompts
        if not size or size >= len(prompts):
            return prompts
        windows = -(-len(prompts) // size)
        return prompts[(step - 1) % windows :: windows]

    def past_deadline(self) -> bool:
        """Called as each step starts: whether the budget (``--max-minutes``,
        ``--max-cost``) is spent, or would be before a step as long as the longest so far
        ends; then no step starts."""
        now = time.perf_counter()
        if self._last_start is not None:
            self.longest_step = max(self.longest_step, now - self._last_start)
        self._last_start = now
        return self.deadline is not None and now + self.longest_step > self.deadline


def step_record(
    work: WorkingModel,
    ledger: Ledger,
    step: int,
    offered: int,
    restored: Indices,
    rolled: Indices,
    loss: float,
    check: Check | None,
    start: float,
    phase: str = "steps",
) -> StepRecord:
    """What step ``step`` did (``check``: its guard check, None when unchecked)."""
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
        utility=None if check is None else check.utility,
        utility_before_rollback=None,
        over_refusal=None if check is None else check.over_refusal,
        holds=None if check is None else check.holds,
        seconds=round(time.perf_counter() - start, 3),
        phase=phase,
        drift=None if check is None else check.drift,
    )


def outcome(
    rate: float,
    records: list[StepRecord],
    kept: int,
    ledger: Ledger,
    start: float,
    harmful_rate: float | None,
) -> RunOutcome:
    """The run's outcome: its steps, the kept state's ``harmful_rate`` and the checked scores
    of the kept step (the last record of that number: a restarted run numbers its steps from
    1 again)."""
    last = next((r for r in reversed(records) if r.step == kept), None) if kept else None
    return RunOutcome(
        rate=rate,
        steps=records,
        kept_step=kept,
        restored=ledger.net_total(kept),
        harmful_rate=harmful_rate,
        utility=last.utility if last else None,
        over_refusal=last.over_refusal if last else None,
        seconds=time.perf_counter() - start,
        drift=last.drift if last else None,
    )


def postfix(record: StepRecord) -> dict[str, str]:
    """The progress bar's figures for ``record``."""

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return {
        "utility": show(record.utility),
        "refusal": show(record.over_refusal),
        "cos": f"{-record.loss:.3f}",
    }
