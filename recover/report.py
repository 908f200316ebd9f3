"""report.json, the model card and the printed summary of a recovery run."""

from __future__ import annotations

from pathlib import Path

from safealign.checkpoint import ModelCard
from safealign.report import markdown_table, write_json

SCORE_ROWS = (
    ("aligned", "aligned (A)"),
    ("finetuned", "fine-tuned (B)"),
    ("recovered", "recovered (C)"),
)


def write_report(path: Path, result) -> Path:
    """Write ``result.to_dict()`` as JSON."""
    return write_json(path, result.to_dict())


def scores_table(result) -> str:
    """A, B and C side by side."""
    rows = [
        {"model": label, **result.scores[key]} for key, label in SCORE_ROWS if key in result.scores
    ]
    return markdown_table(
        rows, ["model", "harmful_rate", "utility", "over_refusal", *_drift(result)]
    )


def steps_table(result) -> str:
    """One row per step of the main run (a check scores no harmful rate)."""
    if result.run is None:
        return ""
    rows = [
        {
            "phase": s.phase,
            "step": s.step,
            "restored": s.restored,
            "rolled_back": s.rolled_back,
            "total": s.restored_total,
            "cos": -s.loss,
            "utility": s.utility,
            "over_refusal": s.over_refusal,
            **({"drift": s.drift} if _drift(result) else {}),
            "holds": s.holds,
            "seconds": s.seconds,
        }
        for s in result.run.steps
    ]
    return markdown_table(rows)


def sweep_table(result) -> str:
    """The trade-off curve: harmful rate and utility per rate."""
    return markdown_table(
        result.sweep,
        [
            "rate",
            "kept_step",
            "restored",
            "harmful_rate",
            "utility",
            "over_refusal",
            *_drift(result),
        ],
    )


def attempts_table(result) -> str:
    """adaptive: one row per attempt, what it reached and its verdict."""
    return markdown_table(
        result.attempts,
        [
            "attempt",
            "schedule",
            "rate",
            "steps",
            "rollback_rate",
            "kept_step",
            "harmful_rate",
            "utility",
            "over_refusal",
            *_drift(result),
            "seconds",
            "verdict",
            "kept",
        ],
    )


def summary(result) -> str:
    """What the CLI prints after a run."""
    parts = [
        f"steps (kept step {result.run.kept_step}):",
        steps_table(result),
        "",
        scores_table(result),
    ]
    if result.attempts:
        parts += ["", "attempts (adaptive):", attempts_table(result)]
    if result.sweep:
        parts += ["", "rate sweep:", sweep_table(result)]
    if result.out is not None:
        unchanged = ": the fine-tuned model unchanged" if result.failure else ""
        parts += ["", f"wrote {result.out} (report.json inside){unchanged}"]
    return "\n".join(parts)


def model_card(result) -> ModelCard:
    """README.md of the recovered checkpoint."""
    plan, run, settings = result.plan, result.run, result.settings
    if result.failure:
        text = (
            f"**Not repaired: this is the fine-tuned model {plan.finetuned} unchanged**, written "
            f"because write_unchanged was set. Harmful-direction restoration (schedule "
            f"{settings.schedule}) found no state that passed its checks: {result.failure}."
        )
    else:
        text = (
            f"The fine-tuned model {plan.finetuned} with {run.restored:,} decoder weights "
            f"(blocks 0..{settings.layer - 1}) reset to their values in the aligned model "
            f"{plan.aligned}, chosen by the gradient of the harmful direction at layer "
            f"{settings.layer} (harmful-direction restoration with rollback, Yang et al. 2025; "
            f"schedule {settings.schedule}). Kept step {run.kept_step} of {_steps(result)}."
        )
        if result.attempts:
            kept = next(a for a in result.attempts if a["kept"])
            text += (
                f" Adaptive: attempt {kept['attempt']} of {len(result.attempts)} was kept "
                f"({kept['schedule']}, rate {kept['rate']:g}: {kept['verdict']})."
            )
        if result.shortfall:
            text += f" **Not a full repair**: {result.shortfall}."
    results = {label: result.scores[key] for key, label in SCORE_ROWS if key in result.scores}
    state = "unchanged, no repair held" if result.failure else "recovered"
    if result.shortfall:
        state = "partly recovered, above the repair target"
    return ModelCard(
        title=f"{Path(result.out).name}: {state}",
        method="recover",
        summary=text,
        settings=settings.to_dict(),
        inputs={"aligned": plan.aligned, "finetuned": plan.finetuned},
        results=results,
    )


def _steps(result) -> int:
    """The kept run's step count (an adaptive attempt may run more than ``--steps``)."""
    kept = next((a for a in result.attempts if a["kept"]), None)
    return result.settings.steps if kept is None else kept["steps"]


def _drift(result) -> list[str]:
    """The drift column, when the check held drift (``--utility drift``)."""
    return ["drift"] if result.settings.drift_max is not None else []
