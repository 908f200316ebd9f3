"""The eval capability's entry point, :func:`evaluate`: load a model, score it, write the
results. Other capabilities score with the :class:`~safealign.eval.Evaluator` directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safealign.eval.evaluator import Evaluator
from safealign.eval.results import Scores, write_results
from safealign.eval.settings import EvalSettings
from safealign.progress import ProgressCallback


@dataclass(frozen=True)
class EvalInputs:
    """What an evaluation reads: ``model`` (a folder or hub id), a LoRA ``adapter`` on it,
    and the sets (each a path, a set or a list; one not given is not scored): ``harmful`` and
    ``benign`` prompts, ``task`` examples with answers. ``drift_reference`` (with
    ``drift_reference_adapter``, a LoRA adapter on it) is the model that ``drift`` on the
    benign prompts is measured from (the user's fine-tuned model B); no drift without it.
    ``durability_data`` (prompt and reply pairs) is what ``settings.durability`` STEPS of
    fine-tuning train on before harm is scored again."""

    model: str | Path
    adapter: str | Path | None = None
    harmful: Any = None
    task: Any = None
    benign: Any = None
    drift_reference: str | Path | None = None
    drift_reference_adapter: str | Path | None = None
    durability_data: str | Path | None = None


def evaluate(
    inputs: EvalInputs,
    settings: EvalSettings | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
) -> Scores:
    """Score ``inputs.model`` (with its adapter) on the sets with ``settings`` (default: the
    defaults); write ``results.json`` and ``samples.jsonl`` into ``out`` when given.
    ``progress`` gets status lines (and shows bars); None is silent. The gate bounds of
    ``settings`` are checked by :func:`~safealign.eval.results.gate_failures`, not here."""
    settings = settings or EvalSettings()
    evaluator = Evaluator(
        inputs.harmful,
        inputs.task,
        inputs.benign,
        settings=settings,
        progress=progress,
        drift_reference=inputs.drift_reference,
        drift_reference_adapter=inputs.drift_reference_adapter,
        durability_data=inputs.durability_data,
    )
    scores = evaluator.score_folder(
        inputs.model, adapter=inputs.adapter, dtype=settings.dtype, device=settings.device
    )
    if out is not None:
        write_results(scores, out)
    return scores
