"""The Python API, :func:`recover`: open the pair, plan, run, write."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safealign.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, validate_checkpoints
from safealign.checkpoint.hub import is_adapter
from safealign.model import resolve_dtype
from safealign.progress import ProgressCallback
from safealign.recover.adaptive import LADDER, repair_target, run_adaptive
from safealign.recover.guard import StepGuard
from safealign.recover.plan import Plan, working_dtype
from safealign.recover.report import model_card, write_report
from safealign.recover.result import RecoveryResult, RunOutcome
from safealign.recover.schedule import run
from safealign.recover.sets import Sets
from safealign.recover.settings import ADAPTIVE_MAX_COST, RecoverSettings
from safealign.recover.weights import (
    PAPER_WARMUP,
    Layout,
    checkpoint_dtype,
    default_warmup,
    layout,
)
from safealign.recover.working import WorkingModel
from safealign.runtime import peak_rss_bytes
from safealign.settings import SettingsError


@dataclass(frozen=True)
class RecoverInputs:
    """What a recovery reads. ``aligned``: the aligned model folder (or hub id).
    ``finetuned``: a model folder or a LoRA adapter on ``aligned``. ``harmful``: prompts for the
    harmful direction and its gradient (path, PromptSet or list; default: the bundled smoke
    set), the first ``max_prompts`` of them. ``eval_harmful``: prompts the harmful rate is
    measured on (default: ``harmful``). ``task``: held-out task examples with answers (path,
    TaskSet or list) whose utility is checked; without them (and ``benign``) there is no check
    and no rollback. ``task_train``: task examples whose prompts steer the rollback gradient
    (default: the first half of ``task``, the second half being checked). ``benign``: benign
    prompts whose over-refusal is checked with utility. ``benign_train``: benign prompts that
    steer the rollback gradient (default: the first half of ``benign``, the second half being
    checked)."""

    aligned: str | Path
    finetuned: str | Path
    harmful: Any = None
    eval_harmful: Any = None
    task: Any = None
    task_train: Any = None
    benign: Any = None
    benign_train: Any = None


def recover(
    inputs: RecoverInputs,
    settings: RecoverSettings | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
) -> RecoveryResult:
    """Restore the fine-tuned model's refusals by resetting a few weights to aligned values.

    ``settings``: see :class:`RecoverSettings` (default: the defaults); out-of-range values
    raise ``SettingsError`` before any checkpoint is opened. ``settings.dry_run``: return the
    plan only, from the checkpoints' headers: no weight is read, nothing is written (``out``
    may then be None). ``out``: the output folder (``settings.out_shard_size``: its shard size;
    writing a shard briefly needs its bytes again in memory). ``progress``: a status line per
    phase, and progress bars on stderr; None is silent.
    """
    start = time.perf_counter()
    say = progress or _silent
    settings = settings or RecoverSettings()
    say("opening the checkpoints (headers)")
    a, b = open_pair(inputs.aligned, inputs.finetuned)
    lay = _layout(b, settings.layer)
    settings = _resolved(settings, lay, b)
    sets = Sets.load(
        inputs.harmful,
        inputs.eval_harmful,
        inputs.task,
        inputs.benign,
        settings.max_prompts,
        inputs.task_train,
        settings.limit,
        inputs.benign_train,
    )
    if settings.drift_max is not None and sets.benign is None:
        raise SettingsError(
            "--utility drift needs benign prompts (--benign): drift is measured on them"
        )
    checked = sets.task is not None or sets.benign is not None
    plan = Plan.build(a, b, lay, settings, rollback=checked)
    result = RecoveryResult(None, plan, sets=sets.describe(), warnings=_input_notes(sets, settings))
    if settings.dry_run:
        result.seconds = time.perf_counter() - start
    elif out is None:
        raise ValueError("out is required unless dry_run is set")
    else:
        plan.needs.at(out).check("recover")  # a clear refusal before loading, not an OOM kill
        with CheckpointWriter(
            out,
            source=b,
            overwrite=settings.overwrite,
            inputs=[a],
            max_shard_size=settings.out_shard_size,
        ) as writer:
            say(f"loading the fine-tuned model ({settings.dtype}, {settings.device})")
            work = WorkingModel(a, b, lay, working_dtype(settings), settings.device)
            say("scoring the references: fine-tuned, then the aligned direction and scores")
            guard = StepGuard(work, sets, settings)
            result.eval_seconds = guard.eval_seconds
            budget = _deadline(start, settings, guard.eval_seconds)
            minutes = _deadline(start, settings.replace(max_cost=0.0), guard.eval_seconds)
            bars = progress is not None
            _run_rates(result, work, guard, sets, bars=bars, budget=budget, minutes=minutes)
            if result.failure is None or settings.write_unchanged:
                say(f"writing {out}")
                _write(writer, result, work, start)
            else:
                say("no repair held: nothing written")
                writer.discard()
                _finish(result, start)
    return result


def _deadline(start: float, settings: RecoverSettings, eval_seconds: float) -> float | None:
    """When no further step may start: the earlier of ``--max-minutes`` and ``--max-cost``
    (its last evaluation kept for scoring the kept state); None without either."""
    budgets = []
    if settings.max_minutes is not None:
        budgets.append(60 * settings.max_minutes)
    if settings.max_cost:
        budgets.append(max(settings.max_cost - 1, 0) * eval_seconds)
    return start + min(budgets) if budgets else None


def _layout(finetuned: Checkpoint, layer: int | None) -> Layout:
    """The restorable weights; a layer the model does not have is refused by its flag."""
    try:
        return layout(finetuned, layer)
    except ValueError as error:
        if str(error).startswith("layer must be"):
            raise SettingsError(f"--{error}") from None
        raise


def _silent(line: str) -> None:
    pass


def _input_notes(sets: Sets, settings: RecoverSettings) -> list[str]:
    """Warnings about missing inputs (also issued as Python warnings)."""
    if sets.task is not None or settings.drift_max is not None:
        return []
    note = "no task data given: recovery runs without utility checks" + (
        "" if sets.benign is not None else " or rollback"
    )
    warnings.warn(note, stacklevel=3)
    return [note]


def _write(
    writer: CheckpointWriter, result: RecoveryResult, work: WorkingModel, start: float
) -> None:
    """The working model's tensors, report.json and the model card into the output folder."""
    for name in work.finetuned.names():
        writer.add(name, work.output_tensor(name))
    result.out = writer.out
    _finish(result, start)
    write_report(writer.folder / "report.json", result)
    writer.finish(model_card(result))


def _finish(result: RecoveryResult, start: float) -> None:
    """Record the run's wall time and peak memory."""
    result.seconds = time.perf_counter() - start
    result.peak_rss_bytes = peak_rss_bytes()


def _run_rates(
    result: RecoveryResult,
    work: WorkingModel,
    guard: StepGuard,
    sets: Sets,
    *,
    bars: bool,
    budget: float | None,
    minutes: float | None,
) -> None:
    """The sweep's extra rates (each undone after), then the main rate, kept in the model;
    ``result.failure`` says why when no repair held, ``result.shortfall`` when the kept state
    is above the repair target. ``budget``: when no step may start (:func:`_deadline`);
    ``minutes``: the same from ``--max-minutes`` alone, which is all that bounds adaptive's
    first attempt (and a sweep's, the same loop)."""
    settings = result.settings
    adaptive = settings.schedule == "adaptive"
    deadline = minutes if adaptive else budget
    # under adaptive, a sweep rate runs the first attempt (the authors' loop, stepped in windows)
    single = LADDER[0].settings(settings, work.layout.n_layers) if adaptive else settings
    result.scores = dict(guard.references)
    for extra in sorted(set(settings.sweep) - {settings.rate}):
        outcome, ledger = run(
            work,
            guard,
            sets,
            single,
            extra,
            label=f"sweep rate={extra}",
            progress=bars,
            deadline=deadline,
        )
        result.sweep.append(outcome.summary())
        work.reset(ledger.take(list(ledger.restored)))
    rate = settings.rate
    if adaptive:
        outcome, result.attempts = run_adaptive(
            work, guard, sets, settings, deadline=deadline, ladder_deadline=budget, progress=bars
        )
    else:
        label = f"recover rate={rate}"
        outcome, _ = run(
            work, guard, sets, settings, rate, label=label, progress=bars, deadline=deadline
        )
    result.run = outcome
    if settings.sweep:
        result.sweep = sorted([*result.sweep, outcome.summary()], key=lambda r: r["rate"])
    if outcome.kept_step == 0 and result.plan.rollback:
        result.failure = _no_repair(outcome, guard) + _unstarted(result.attempts, settings)
    else:
        result.scores["recovered"] = outcome.scores()
        result.shortfall = _shortfall(outcome, guard, settings)
        if result.shortfall:
            result.shortfall += _unstarted(result.attempts, settings)


def _unstarted(attempts: list[dict], settings: RecoverSettings) -> str:
    """``; attempt N, M not started: the budget (...) was spent`` when adaptive skipped any."""
    skipped = [str(a["attempt"]) for a in attempts if a["verdict"] == "skipped"]
    if not skipped:
        return ""
    budgets = [f"--max-cost {settings.max_cost:g}"] if settings.max_cost else []
    if settings.max_minutes is not None:
        budgets.append(f"--max-minutes {settings.max_minutes:g}")
    spent = " or ".join(budgets)
    return f"; attempt {', '.join(skipped)} not started: the budget ({spent}) was spent"


def _shortfall(outcome: RunOutcome, guard: StepGuard, settings: RecoverSettings) -> str | None:
    """Why the kept state is no repair, in one line: its harmful rate above A's plus the
    margin; None when it is within."""
    target = repair_target(guard, settings)
    if outcome.harmful_rate is None or outcome.harmful_rate <= target:
        return None
    a = guard.references["aligned"]["harmful_rate"]
    return (
        f"the kept state (step {outcome.kept_step}) is {outcome.harmful_rate:.3f} harmful, "
        f"above the target {target:.3f} (A's {a:.3f} + --harmful-margin "
        f"{settings.harmful_margin:g})"
    )


def _no_repair(outcome: RunOutcome, guard: StepGuard) -> str:
    """Why no repair held, in one line: the checked state closest to holding, against the
    guard's bounds, and the fine-tuned model's own scores (its harmful rate is what stays)."""
    best, b = outcome.closest_checked(), guard.references["finetuned"]
    if best is None:
        reached = "no step was checked"
    else:
        reached = f"the closest checked state (step {best.step}, {best.phase}) reached" + (
            _bounded("utility", best.utility, "floor", guard.floor)
            + _bounded("over-refusal", best.over_refusal, "ceiling", guard.ceiling)
            + _bounded("drift", best.drift, "bound", guard.drift_max)
        ).removeprefix(",")
    own = f"harmful rate {b['harmful_rate']:.3f}" + _bounded("utility", b["utility"], "", None)
    return f"{reached}; the fine-tuned model: {own}"


def _bounded(name: str, value: float | None, bound: str, limit: float | None) -> str:
    """``, NAME V (BOUND L)``; empty without a value, the bound left out without a limit."""
    if value is None:
        return ""
    return f", {name} {value:.3f}" + ("" if limit is None else f" ({bound} {limit:.3f})")


def _resolved(settings: RecoverSettings, lay: Layout, finetuned: Checkpoint) -> RecoverSettings:
    """``settings`` with layer, warm-up, step prompts, dtype, device and cost budget as the run
    uses them (``adaptive`` leaves warm-up and step prompts to each attempt)."""
    dtype = resolve_dtype(settings.dtype)
    if dtype == "auto":
        dtype = checkpoint_dtype(finetuned)
    return settings.replace(
        layer=lay.layer,
        warmup=_default_warmup(settings.schedule, lay.n_layers)
        if settings.warmup is None and settings.schedule != "adaptive"
        else settings.warmup,
        step_prompts=0
        if settings.step_prompts is None and settings.schedule != "adaptive"
        else settings.step_prompts,
        dtype=str(dtype).removeprefix("torch."),
        device=settings.device or "cpu",
        max_cost=(ADAPTIVE_MAX_COST if settings.schedule == "adaptive" else 0.0)
        if settings.max_cost is None
        else settings.max_cost,
    )


def _default_warmup(schedule: str, n_layers: int) -> int:
    """The paper's 5 under ``paper``; under ``guarded``, 1 for small models (see
    :func:`~safealign.recover.weights.default_warmup`); ``adaptive`` leaves it to each
    attempt."""
    return PAPER_WARMUP if schedule == "paper" else default_warmup(n_layers)


def open_pair(aligned, finetuned) -> tuple[Checkpoint, Checkpoint]:
    """Open and validate (aligned, fine-tuned); a fine-tuned adapter is put on the aligned."""
    a = Checkpoint.open(aligned)
    if a.is_adapter:
        raise CheckpointError(f"aligned must be a model folder, not an adapter: {a.path}")
    # an adapter is put on A; one opened by hub id is named by its id
    b = Checkpoint.open(finetuned, base=a if is_adapter(finetuned) else None)
    validate_checkpoints(a, b)
    return a, b
