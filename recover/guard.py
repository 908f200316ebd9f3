"""The step guard: what every step is steered by and checked against, taken once from A and B.

A check scores only what the schedule decides on: utility (with task data) and over-refusal
(with benign prompts) of the working model, and with ``--utility drift`` its drift from B on the
checked benign prompts. A step holds when utility stays at or above the floor,
``(1 - metric_drop)`` x B's, over-refusal at or below the ceiling, ``refusal_rise`` above the
higher of A's and B's, and drift at or below its bound. Without task data and benign prompts
nothing is checked and every step holds. The harmful rate, which decides nothing, is scored for
A, B and the kept state only: generating replies to the harmful prompts at every check was most
of a run's time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from safealign.eval import Evaluator
from safealign.recover.direction import mean_state
from safealign.recover.sets import Sets
from safealign.recover.settings import RecoverSettings
from safealign.recover.working import WorkingModel


@dataclass(frozen=True)
class Check:
    """The working model's checked scores, and whether they are within the guard's bounds."""

    utility: float | None
    over_refusal: float | None
    drift: float | None
    holds: bool


class StepGuard:
    """Scores B, takes B's centroids on the kept sets, then holds A in the model for A's
    harmful direction and scores; B is back in the model when the constructor returns."""

    def __init__(self, work: WorkingModel, sets: Sets, settings: RecoverSettings):
        scoring = {
            "judge": settings.judge,
            "metric": settings.metric,
            "batch_size": settings.batch_size,
            "max_new_tokens": settings.max_new_tokens,
            "cache": False,
        }
        # only its harmful rate is read: replies stop once the judge's verdict is decided
        self.harmful = Evaluator(harmful=sets.eval_harmful, stop_when_decided=True, **scoring)
        checked = sets.task is not None or sets.benign is not None
        self.checker = Evaluator(task=sets.task, benign=sets.benign, **scoring) if checked else None
        self.drift_max = settings.drift_max
        if self.drift_max is not None:  # B's replies and log-probabilities, B in the model
            self.checker.drift_reference = self.checker.build_reference(work.model, work.tokenizer)
        layer, batch_size = work.layout.layer, settings.grad_batch_size
        start = time.perf_counter()
        finetuned = self.score(work)
        #: one evaluation of B on the run's sets: the unit of ``--max-cost``
        self.eval_seconds = time.perf_counter() - start
        self.keep_sets = [
            (prompts, mean_state(work.model, work.tokenizer, prompts, layer, batch_size))
            for prompts in sets.keep_prompts
        ]
        with work.holding_aligned():
            self.direction = mean_state(
                work.model, work.tokenizer, sets.harmful.prompts, layer, batch_size
            )
            aligned = self.score(work)
        self.references = {"aligned": aligned, "finetuned": finetuned}
        self.floor = (
            None
            if finetuned["utility"] is None
            else finetuned["utility"] * (1 - settings.metric_drop)
        )
        self.ceiling = (
            None
            if finetuned["over_refusal"] is None
            else max(aligned["over_refusal"], finetuned["over_refusal"]) + settings.refusal_rise
        )

    @property
    def checks(self) -> bool:
        """Whether steps are checked at all (task data or benign prompts given)."""
        return self.floor is not None or self.ceiling is not None or self.drift_max is not None

    def score(self, work: WorkingModel) -> dict[str, float | None]:
        """The working model's harmful rate, utility and over-refusal."""
        return {"harmful_rate": self.harmful_rate(work), **self._checked(work)}

    def harmful_rate(self, work: WorkingModel) -> float:
        return self.harmful.score(work.model, work.tokenizer).harmful_rate

    def _checked(self, work: WorkingModel) -> dict[str, float | None]:
        if self.checker is None:
            return {"utility": None, "over_refusal": None, "drift": None}
        scores = self.checker.score(work.model, work.tokenizer)
        return {
            "utility": scores.utility,
            "over_refusal": scores.over_refusal,
            "drift": scores.drift,
        }

    def check(self, work: WorkingModel) -> Check:
        """Score what the schedule decides on; it holds when within the floor, the ceiling and
        the drift bound."""
        scores = self._checked(work)
        holds = (
            (self.floor is None or scores["utility"] >= self.floor)
            and (self.ceiling is None or scores["over_refusal"] <= self.ceiling)
            and (self.drift_max is None or scores["drift"] <= self.drift_max)
        )
        return Check(**scores, holds=holds)
