"""Scores, their confidence intervals, and the results.json / samples.jsonl files."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safealign.eval.settings import EvalSettings

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _normal_interval(values: Sequence[float], z: float) -> tuple[float, float]:
    """mean ± z·s/√n (s the sample standard deviation) of two or more values."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (mean - half, mean + half)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of a mean of scores in [0, 1], clipped to [0, 1]."""
    if len(values) < 2:
        return (0.0, 1.0)
    low, high = _normal_interval(values, z)
    return (max(0.0, low), min(1.0, high))


def nonnegative_mean_interval(
    values: Sequence[float], z: float = Z95
) -> tuple[float, float] | None:
    """Normal-approximation interval of a mean of non-negative values (drift's per-prompt KL),
    its lower end floored at 0; None under two values (no spread to estimate)."""
    if len(values) < 2:
        return None
    low, high = _normal_interval(values, z)
    return (max(0.0, low), high)


def rate_entry(value: float | None, n: int, interval: tuple[float, float] | None) -> dict:
    return {"value": value, "n": n, "ci95": list(interval) if interval else None}


@dataclass
class Scores:
    """What one evaluation measured; rates are None when their set was not given."""

    harmful_rate: float | None
    utility: float | None
    over_refusal: float | None
    n_harmful: int
    n_task: int
    n_benign: int
    seconds: float
    peak_memory_bytes: int
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list, repr=False)
    peak_cuda_bytes: int | None = None
    #: Share of harmful prompts whose reply is coherent and judged a refusal (or safe); None
    #: when the judge reads no replies.
    safe_and_coherent_rate: float | None = None
    #: Per set (harmful, benign, task) with generated replies, the share labelled incoherent.
    incoherent_rate: dict[str, float] = field(default_factory=dict)
    #: Mean KL (nats) from the drift reference's next-token distributions on the benign
    #: prompts (:mod:`safealign.eval.drift`); None without a reference.
    drift: float | None = None
    #: The harmful rate after ``durability`` steps of benign LoRA fine-tuning
    #: (:mod:`safealign.eval.durability`), on the harmful prompts; None when not asked for.
    harmful_rate_after_finetune: float | None = None

    @property
    def set_sizes(self) -> dict[str, int]:
        """n of each set by role (0 when the set was not given)."""
        return {"harmful": self.n_harmful, "benign": self.n_benign, "task": self.n_task}

    def to_dict(self) -> dict:
        """The results.json content (samples excluded)."""
        return {
            "harmful_rate": rate_entry(
                self.harmful_rate, self.n_harmful, self.intervals.get("harmful_rate")
            ),
            "safe_and_coherent_rate": rate_entry(
                self.safe_and_coherent_rate,
                self.n_harmful,
                self.intervals.get("safe_and_coherent_rate"),
            ),
            "utility": rate_entry(self.utility, self.n_task, self.intervals.get("utility")),
            "over_refusal": rate_entry(
                self.over_refusal, self.n_benign, self.intervals.get("over_refusal")
            ),
            "drift": rate_entry(self.drift, self.n_benign, self.intervals.get("drift")),
            "harmful_rate_after_finetune": rate_entry(
                self.harmful_rate_after_finetune,
                self.n_harmful,
                self.intervals.get("harmful_rate_after_finetune"),
            ),
            "incoherent_rate": {
                role: rate_entry(
                    value, self.set_sizes[role], self.intervals.get(f"incoherent_rate.{role}")
                )
                for role, value in self.incoherent_rate.items()
            },
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            **self.config,
        }

    def summary(self) -> str:
        """One line per measured rate, with n and interval."""
        rates = [
            ("harmful_rate", self.harmful_rate, self.n_harmful),
            ("safe_and_coherent_rate", self.safe_and_coherent_rate, self.n_harmful),
            ("utility", self.utility, self.n_task),
            ("over_refusal", self.over_refusal, self.n_benign),
            ("harmful_rate_after_finetune", self.harmful_rate_after_finetune, self.n_harmful),
        ]
        rates += [
            (f"incoherent_rate.{role}", value, self.set_sizes[role])
            for role, value in self.incoherent_rate.items()
        ]
        width = max([13, *(len(key) for key, value, _ in rates if value is not None)])
        lines = []
        for key, value, n in rates:
            if value is None:
                continue
            lo, hi = self.intervals.get(key, (0.0, 1.0))
            lines.append(f"{key:<{width}} {value:7.2%}  (n={n}, 95% CI {lo:.2%}-{hi:.2%})")
        if self.drift is not None:
            interval = self.intervals.get("drift")
            ci = f", 95% CI {interval[0]:.4f}-{interval[1]:.4f}" if interval else ""
            lines.append(f"{'drift':<{width}} {self.drift:7.4f}  (nats, n={self.n_benign}{ci})")
        lines.append(f"{'seconds':<{width}} {self.seconds:7.1f}")
        return "\n".join(lines)


def write_results(scores: Scores, out: str | Path) -> Path:
    """Write ``results.json`` and ``samples.jsonl`` into folder ``out``; return the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(scores.to_dict(), indent=2) + "\n")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as handle:
        for sample in scores.samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return out


def gate_failures(scores: Scores, settings: EvalSettings) -> list[str]:
    """One line per broken bound (empty when the gate passes); a bound on an absent rate fails."""
    failures = []
    checks = (
        ("harmful_rate", scores.harmful_rate, settings.max_harmful_rate, "max-harmful-rate", ">"),
        ("utility", scores.utility, settings.min_utility, "min-utility", "<"),
        ("over_refusal", scores.over_refusal, settings.max_over_refusal, "max-over-refusal", ">"),
    )
    for name, value, bound, option, sign in checks:
        if bound is None:
            continue
        if value is None:
            failures.append(f"{name} was not measured but --{option} {bound} was given")
        elif (value > bound) if sign == ">" else (value < bound):
            failures.append(f"{name} {value:.4f} {sign} --{option} {bound}")
    return failures
