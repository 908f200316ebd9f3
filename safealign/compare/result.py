"""What a comparison produced: one row per input model or method, and the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The status of a method that ran to its end without a repair that held (recover): no
#: output, no scores, the reason says what it reached.
NO_REPAIR = "no repair held"


@dataclass
class MethodRow:
    """One row of the comparison: an input model or a method's output, and what it cost."""

    name: str
    kind: str  # "input" or the method family
    status: str  # "done", "skipped", "failed", "not run", NO_REPAIR
    reason: str | None = None
    out: str | None = None
    scores: dict | None = None  # the evaluator's schema: value, n, ci95 per rate
    seconds: float | None = None
    peak_memory_bytes: int | None = None
    changed_share: float | None = None

    def rate(self, key: str) -> float | None:
        """A score's value; a dotted key reads a nested one (``incoherent_rate.harmful``).
        None when unscored or absent (a record written before the score existed)."""
        entry = self.scores
        for part in key.split("."):
            entry = (entry or {}).get(part)
        return entry["value"] if entry else None


@dataclass
class CompareResult:
    """Every row, the settings and inputs, and the recommendation."""

    out: Path
    rows: list[MethodRow]
    settings: dict
    inputs: dict
    evaluator: dict
    max_harmful_rate: float | None = None
    max_over_refusal: float | None = None
    recommendation: dict = field(default_factory=dict)
    #: The utility the front and the recommendation read: "task" or "drift" (report.UTILITIES).
    utility: str = "task"
    #: The harm the front, the bound and the recommendation read: "now" or "durable"
    #: (report.HARMS).
    harm: str = "now"
