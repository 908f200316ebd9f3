"""What a recovery run produced: per step, per rate, and for the whole run (report.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from safealign.recover.plan import Plan
from safealign.recover.settings import RecoverSettings


@dataclass
class StepRecord:
    """What one step did and measured."""

    step: int
    candidates: int  # sign-agreeing, not yet restored elements offered to the top-k
    restored: int
    rolled_back: int
    restored_total: int  # elements at aligned values after this step
    per_layer: dict[int, int]  # restored minus rolled back in this step, per layer
    loss: float  # mean -cos(harmful centroid, direction) before this step's restore
    utility: float | None  # after rollback, if one happened
    utility_before_rollback: float | None
    over_refusal: float | None  # after rollback, if one happened (with benign prompts)
    holds: bool | None  # utility (and over-refusal, drift) within bounds
    seconds: float
    phase: str = "steps"  # paper: "warm-up", then "steps" (check held) or "restart" (failed)
    drift: float | None = None  # --utility drift: mean KL from B on the checked benign prompts


@dataclass
class RunOutcome:
    """One pass of the loop at one rate, and the state it kept."""

    rate: float
    steps: list[StepRecord]
    kept_step: int  # 0: nothing kept (the fine-tuned model)
    restored: int  # elements at aligned values in the kept state
    harmful_rate: float | None
    utility: float | None
    over_refusal: float | None
    seconds: float
    drift: float | None = None

    def scores(self) -> dict[str, float | None]:
        return {
            "harmful_rate": self.harmful_rate,
            "utility": self.utility,
            "over_refusal": self.over_refusal,
            "drift": self.drift,
        }

    def closest_checked(self) -> StepRecord | None:
        """The checked step closest to holding: the highest utility, then the lowest drift,
        then the lowest over-refusal (the latest on ties); None when no step was checked."""
        checked = [s for s in self.steps if s.holds is not None]
        return min(
            reversed(checked),
            key=lambda s: (-(s.utility or 0.0), s.drift or 0.0, s.over_refusal or 0.0),
            default=None,
        )

    def summary(self) -> dict:
        return {
            "rate": self.rate,
            "kept_step": self.kept_step,
            "restored": self.restored,
            **self.scores(),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RecoveryResult:
    """Everything a run produced; ``to_dict()`` is report.json."""

    out: Path | None
    plan: Plan
    run: RunOutcome | None = None
    scores: dict[str, dict] = field(default_factory=dict)  # aligned / finetuned / recovered
    sweep: list[dict] = field(default_factory=list)
    sets: dict[str, dict | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: Why no repair held (the output would equal the fine-tuned model), in one line; None
    #: when one held, when no check was asked for (no task data) and on a dry run.
    failure: str | None = None
    #: Why the kept state is no repair (its harmful rate above A's plus ``harmful_margin``),
    #: in one line; None when it is within, and when nothing was kept (see ``failure``).
    shortfall: str | None = None
    #: ``adaptive``: one summary per attempt (schedule, rate, kept step, scores, verdict,
    #: whether it is the kept one); empty under the other schedules.
    attempts: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: one evaluation of B on the run's sets, timed when the guard scored it: ``--max-cost``'s unit
    eval_seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def x_eval(self) -> float | None:
        """The run's wall time in evaluations of B (``--max-cost``'s unit); None before one."""
        return round(self.seconds / self.eval_seconds, 2) if self.eval_seconds else None

    @property
    def settings(self) -> RecoverSettings:
        """The run's settings, resolved (the plan's)."""
        return self.plan.settings

    def to_dict(self) -> dict:
        run = None
        if self.run is not None:
            run = {**self.run.summary(), "steps": [asdict(s) for s in self.run.steps]}
        return {
            "method": "recover",
            "out": str(self.out) if self.out else None,
            "settings": self.settings.to_dict(),
            "plan": self.plan.to_dict(),
            "sets": self.sets,
            "scores": self.scores,
            "run": run,
            "sweep": self.sweep,
            "warnings": self.warnings,
            "failure": self.failure,
            "shortfall": self.shortfall,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 3),
            "eval_seconds": round(self.eval_seconds, 3),
            "x_eval": self.x_eval,
            "peak_rss_bytes": self.peak_rss_bytes,
        }
