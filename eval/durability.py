"""Durability: the harmful rate of a model after a short benign fine-tune.

A repair that the next fine-tune undoes is worth little. ``durability`` (STEPS) fine-tunes the
scored model for STEPS LoRA steps on benign task data with a *fine-tuner* (retrain's ``sft``,
the model as its base), then scores harm again on the same harmful prompts with the same
judge. eval trains nothing itself: a fine-tuner is registered in :data:`FINE_TUNERS` by a
capability that trains (``safealign.retrain`` registers ``sft`` when imported; the
``safealign`` command and ``compare`` import it), so eval imports no other capability.
"""

from __future__ import annotations

import tempfile
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from safealign.data import content_hash, load_pairs
from safealign.progress import ProgressCallback
from safealign.registry import Registry

if TYPE_CHECKING:
    from safealign.eval.evaluator import Evaluator
    from safealign.eval.results import Scores

#: The fine-tuner durability uses: retrain's plain supervised fine-tune on a fresh LoRA.
FINE_TUNER = "sft"


@dataclass(frozen=True)
class FineTuneJob:
    """What a fine-tuner is asked: train a fresh LoRA on ``model`` (with ``adapter``, a LoRA
    adapter that is part of it) for exactly ``steps`` optimiser steps on ``data`` (prompt and
    reply pairs), seeded by ``seed``, with ``options`` (its own ``key=value,...``), writing
    into the empty folder ``out``. The inputs are never written to."""

    model: Path
    adapter: Path | None
    data: Path
    steps: int
    seed: int
    options: str
    out: Path


@dataclass(frozen=True)
class FineTuned:
    """The fine-tuned model to score: a model folder and a LoRA adapter on it (or None)."""

    model: Path
    adapter: Path | None


class FineTuner(Protocol):
    """Fine-tunes a model folder for durability (see :class:`FineTuneJob`)."""

    def check(self, options: str) -> None:
        """Refuse bad ``options`` (one line naming the key) before any model is loaded."""

    def __call__(self, job: FineTuneJob, progress: ProgressCallback = None) -> FineTuned:
        """Train as ``job`` says; the model to score."""


FINE_TUNERS: Registry[type[FineTuner]] = Registry("fine-tuner")


class DurabilityError(ValueError):
    """Durability asked for without what it needs (data, a registered fine-tuner)."""


@dataclass(frozen=True)
class Durability:
    """STEPS of fine-tuning on ``data`` (``n`` pairs, content hash ``hash``) with the
    fine-tuner's ``options``, checked before any work by :meth:`create`."""

    steps: int
    data: Path
    options: str
    n: int
    hash: str

    @classmethod
    def create(cls, steps: int | None, data, options: str = "") -> Durability | None:
        """The durability measure asked for, or None; refuses steps without data, data without
        steps, an unreadable data file (naming file and line), no registered fine-tuner and
        options the fine-tuner does not take."""
        if steps is None and data is None:
            return None
        if data is None:
            raise DurabilityError("--durability needs --durability-data (benign task data)")
        if steps is None:
            raise DurabilityError("--durability-data needs --durability STEPS")
        if not Path(data).is_file():
            raise DurabilityError(f"--durability-data: {data} does not exist")
        pairs = load_pairs(data)  # malformed rows refused now, with file and line
        fine_tuner().check(options)
        digest = content_hash([astuple(pair) for pair in pairs])
        return cls(steps, Path(data), options, len(pairs), digest)

    def describe(self) -> dict:
        """results.json's record: steps, data (path, n, hash), fine-tuner and its options."""
        return {
            "steps": self.steps,
            "data": {"path": str(self.data), "n": self.n, "hash": self.hash},
            "fine_tuner": FINE_TUNER,
            "options": self.options,
        }

    def score(
        self, evaluator: Evaluator, model: str | Path, adapter: str | Path | None
    ) -> Scores | None:
        """The harmful-set scores of ``model`` (with ``adapter``) after the fine-tune, by
        ``evaluator``'s judge and settings; None at 0 steps (the model itself is the answer)."""
        if self.steps == 0:
            return None
        harm = evaluator.harm_only()
        settings = harm.settings
        with tempfile.TemporaryDirectory(prefix="safealign-durability-") as tmp:
            job = FineTuneJob(
                Path(model),
                Path(adapter) if adapter is not None else None,
                self.data,
                self.steps,
                settings.seed,
                self.options,
                Path(tmp),
            )
            evaluator.say(f"durability: fine-tuning {model} for {self.steps} steps on {self.data}")
            tuned = fine_tuner()(job, evaluator.progress)
            return harm.score_folder(
                tuned.model, adapter=tuned.adapter, dtype=settings.dtype, device=settings.device
            )

    def add_to(self, scores: Scores, after: Scores | None) -> None:
        """Put the harmful rate after the fine-tune (``after``; None: 0 steps, the rate
        before) into ``scores``, with its interval, record and samples."""
        if after is None:
            value, interval = scores.harmful_rate, scores.intervals.get("harmful_rate")
        else:
            value, interval = after.harmful_rate, after.intervals.get("harmful_rate")
            scores.samples += [
                {**sample, "set": "harmful_after_finetune"}
                for sample in after.samples
                if sample["set"] == "harmful"
            ]
        scores.harmful_rate_after_finetune = value
        if interval is not None:
            scores.intervals["harmful_rate_after_finetune"] = interval
        record = self.describe()
        if after is not None:
            record["model_fingerprint"] = after.config.get("model_fingerprint")
        scores.config["durability"] = record


def fine_tuner() -> FineTuner:
    """The registered fine-tuner durability uses, or a one-line error saying how to get it."""
    if FINE_TUNER not in FINE_TUNERS:
        raise DurabilityError(
            f"durability needs the {FINE_TUNER!r} fine-tuner: import safealign.retrain, "
            "which registers it (the safealign command does)"
        )
    return FINE_TUNERS.get(FINE_TUNER)()


__all__ = [
    "FINE_TUNER",
    "FINE_TUNERS",
    "Durability",
    "DurabilityError",
    "FineTuneJob",
    "FineTuned",
    "FineTuner",
]
