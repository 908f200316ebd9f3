"""The recovery loop and its Python API, :func:`recover`.

One working model (the fine-tuned one) lives in memory. Per step: accumulate the gradient of
-cos(harmful-prompt centroid, aligned harmful direction) over the blocks below the direction
layer, restore the top ``rate`` share of sign-agreeing elements to their aligned values, and
(from the end of the warm-up on) check the step: utility on task data must stay within
``metric_drop`` of the fine-tuned model's and, when benign prompts are given, over-refusal
must not rise more than ``refusal_rise`` above the higher of A's and B's. A step that fails
is partly rolled back. The kept state is the last step that held.
"""

from __future__ import annotations

import resource
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safealign.checkpoint import Checkpoint, CheckpointError, CheckpointWriter, validate_checkpoints
from safealign.data import PromptSet, TaskExample, TaskSet, load_prompts, load_task
from safealign.eval import Evaluator
from safealign.model import resolve_dtype
from safealign.recover.direction import cosine_backward, mean_state
from safealign.recover.ledger import Ledger
from safealign.recover.plan import Plan, count_candidates, memory_estimate
from safealign.recover.report import model_card, write_report
from safealign.recover.rollback import choose_rollback, gathered_gradients
from safealign.recover.select import Picked, TopKPool, restore_candidates
from safealign.recover.weights import (
    Layout,
    checkpoint_dtype,
    copy_into,
    default_warmup,
    layout,
    load_working_model,
    model_tensor,
    read,
)


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
    harmful_rate: float | None
    utility: float | None  # after rollback, if one happened
    utility_before_rollback: float | None
    over_refusal: float | None  # after rollback, if one happened (with benign prompts)
    holds: bool | None  # utility (and over-refusal) within bounds
    seconds: float


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

    def summary(self) -> dict:
        return {
            "rate": self.rate,
            "kept_step": self.kept_step,
            "restored": self.restored,
            "harmful_rate": self.harmful_rate,
            "utility": self.utility,
            "over_refusal": self.over_refusal,
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
    sets: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        run = None
        if self.run is not None:
            run = {**self.run.summary(), "steps": [asdict(s) for s in self.run.steps]}
        return {
            "method": "recover",
            "out": str(self.out) if self.out else None,
            "settings": self.settings,
            "plan": self.plan.to_dict(),
            "sets": self.sets,
            "scores": self.scores,
            "run": run,
            "sweep": self.sweep,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _check_settings(
    rate, steps, warmup, metric_drop, rollback_rate, sweep, batch_size, max_prompts, refusal_rise
) -> None:
    problems = []
    for r in [rate, *sweep]:
        if not 0 < r < 1:
            problems.append(f"rate must be in (0, 1), got {r}")
    if steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        problems.append(f"warmup must be >= 0, got {warmup}")
    if not 0 <= metric_drop < 1:
        problems.append(f"metric_drop must be in [0, 1), got {metric_drop}")
    if not 0 <= refusal_rise < 1:
        problems.append(f"refusal_rise must be in [0, 1), got {refusal_rise}")
    if not 0 <= rollback_rate <= 1:
        problems.append(f"rollback_rate must be in [0, 1], got {rollback_rate}")
    if max_prompts is not None and max_prompts < 1:
        problems.append(f"max_prompts must be >= 1, got {max_prompts}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if problems:
        raise ValueError("; ".join(problems))


def open_pair(aligned, finetuned) -> tuple[Checkpoint, Checkpoint]:
    """Open and validate (aligned, fine-tuned); a fine-tuned adapter is put on the aligned."""
    a = Checkpoint.open(aligned)
    if a.is_adapter:
        raise CheckpointError(f"aligned must be a model folder, not an adapter: {a.path}")
    path = Path(finetuned).expanduser()
    b = (
        Checkpoint.open(path, base=a)
        if (path / "adapter_config.json").exists()
        else Checkpoint.open(path)
    )
    validate_checkpoints(a, b)
    return a, b


class _Session:
    """The working model and everything fixed across steps and sweep runs."""

    def __init__(self, a, b, lay: Layout, dtype, device, harmful, eval_harmful, task, benign, opts):
        self.a, self.b, self.layout, self.opts = a, b, lay, opts
        self.model, self.tokenizer = load_working_model(a, b, dtype, device)
        self.harmful = harmful
        self.task_prompts = [e.prompt for e in task.examples] if task is not None else None
        self.benign_prompts = benign.prompts if benign is not None else None
        common = {
            "batch_size": opts["eval_batch_size"],
            "max_new_tokens": opts["max_new_tokens"],
            "use_cache": False,
        }
        self.harm_eval = Evaluator(harmful=eval_harmful, judge=opts["judge"], **common)
        self.task_eval = (
            Evaluator(task=task, metric=opts["metric"], **common) if task is not None else None
        )
        self.benign_eval = (
            Evaluator(benign=benign, judge=opts["judge"], **common) if benign is not None else None
        )
        self.params = {t.name: self.model.get_parameter(t.name) for t in lay.targets}

    # -- scoring

    def harmful_rate(self) -> float:
        return self.harm_eval.score(self.model, self.tokenizer).harmful_rate

    def utility(self) -> float | None:
        if self.task_eval is None:
            return None
        return self.task_eval.score(self.model, self.tokenizer).utility

    def over_refusal(self) -> float | None:
        if self.benign_eval is None:
            return None
        return self.benign_eval.score(self.model, self.tokenizer).over_refusal

    def scores(self) -> dict:
        return {
            "harmful_rate": self.harmful_rate(),
            "utility": self.utility(),
            "over_refusal": self.over_refusal(),
        }

    # -- the fixed references

    def references(self) -> dict[str, dict]:
        """Score B, take B's centroids on the kept sets (task, benign), swap A in for its
        direction and scores, swap back."""
        layer, bs = self.layout.layer, self.opts["batch_size"]
        finetuned_scores = self.scores()
        self.keep_sets = [
            (prompts, mean_state(self.model, self.tokenizer, prompts, layer, bs))
            for prompts in (self.task_prompts, self.benign_prompts)
            if prompts
        ]
        copy_into(self.model, self.a, self.a.names())
        self.direction = mean_state(self.model, self.tokenizer, self.harmful, layer, bs)
        aligned_scores = self.scores()
        back = (
            self.b.lora_targets() + self.b.replaced_names() if self.b.is_adapter else self.b.names()
        )
        copy_into(self.model, self.b, back)
        self.finetuned_utility = finetuned_scores["utility"]
        self.refusal_ceiling = None
        if self.benign_eval is not None:
            reference = max(aligned_scores["over_refusal"], finetuned_scores["over_refusal"])
            self.refusal_ceiling = reference + self.opts["refusal_rise"]
        return {"aligned": aligned_scores, "finetuned": finetuned_scores}

    # -- one step's parts

    def select(self, k: int, ledger: Ledger) -> tuple[dict[str, Picked], int]:
        names = [t.name for t in self.layout.targets]
        pool, offered = TopKPool(k), 0
        for tensor_id, name in enumerate(names):
            param = self.params[name]
            if param.grad is None:
                continue
            aligned = read(self.a, name, param.dtype).to(param.device)
            blocked = ledger.blocked(name)
            for index, scores, values in restore_candidates(param, param.grad, aligned, blocked):
                offered += index.numel()
                pool.offer(tensor_id, index, scores, values)
            del aligned
        return pool.result(names), offered

    @torch.no_grad()
    def write(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (index, vals) in values.items():
            param = self.params[name]
            param.data.view(-1)[index.to(param.device)] = vals.to(param.device, param.dtype)

    def rollback(self, step_picked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Roll back part of a step, chosen by the gradient toward B's centroids on the
        kept sets (the task prompts, and the benign prompts when given)."""
        grads: dict[str, torch.Tensor] = {}
        for prompts, centroid in self.keep_sets:
            part = gathered_gradients(
                self.model,
                self.tokenizer,
                prompts,
                self.layout.layer,
                centroid,
                step_picked,
                self.opts["batch_size"],
            )
            grads = {n: grads[n] + g if n in grads else g for n, g in part.items()}
        chosen = choose_rollback(self.model, self.b, step_picked, grads, self.opts["rollback_rate"])
        self.write(chosen)
        return {name: index for name, (index, _) in chosen.items()}

    def check(self, floor: float | None) -> tuple[float | None, float | None, bool]:
        """(utility, over-refusal, whether both are within bounds) of the current state."""
        utility, refusal = self.utility(), self.over_refusal()
        holds = (floor is None or utility >= floor) and (
            self.refusal_ceiling is None or refusal <= self.refusal_ceiling
        )
        return utility, refusal, holds

    # -- the loop

    def run(self, rate: float, *, label: str) -> tuple[RunOutcome, Ledger]:
        """Run all steps at ``rate``; the model is left in the kept state."""
        opts, lay = self.opts, self.layout
        start, k = time.perf_counter(), lay.per_step(rate)
        ledger, records, kept = Ledger(), [], 0
        base = self.finetuned_utility
        floor = None if base is None else base * (1 - opts["metric_drop"])
        checked = floor is not None or self.refusal_ceiling is not None
        for param in self.params.values():
            param.requires_grad_(True)
            param.grad = None
        bar = tqdm(range(1, opts["steps"] + 1), desc=label, disable=not opts["progress"])
        try:
            for step in bar:
                t0 = time.perf_counter()
                loss = cosine_backward(
                    self.model,
                    self.tokenizer,
                    self.harmful,
                    lay.layer,
                    self.direction,
                    opts["batch_size"],
                )
                picked, offered = self.select(k, ledger)
                self.write({n: (p.index, p.values) for n, p in picked.items()})
                step_index = {n: p.index for n, p in picked.items()}
                ledger.record_restore(step, step_index)
                utility = before = refusal = holds = None
                rolled: dict[str, torch.Tensor] = {}
                if checked and step >= min(max(opts["warmup"], 1), opts["steps"]):
                    utility, refusal, holds = self.check(floor)
                    if not holds and opts["rollback_rate"] > 0 and step_index:
                        rolled = self.rollback(step_index)
                        ledger.record_rollback(step, rolled)
                        before = utility
                        utility, refusal, holds = self.check(floor)
                    if holds:
                        kept = step
                elif not checked:
                    kept = step
                net = {n: i.numel() for n, i in step_index.items()}
                for n, i in rolled.items():
                    net[n] -= i.numel()
                record = StepRecord(
                    step=step,
                    candidates=offered,
                    restored=sum(i.numel() for i in step_index.values()),
                    rolled_back=sum(i.numel() for i in rolled.values()),
                    restored_total=ledger.net_total(step),
                    per_layer=lay.layer_counts(net),
                    loss=loss,
                    harmful_rate=self.harmful_rate(),
                    utility=utility,
                    utility_before_rollback=before,
                    over_refusal=refusal,
                    holds=holds,
                    seconds=round(time.perf_counter() - t0, 3),
                )
                records.append(record)
                bar.set_postfix(
                    harmful=f"{record.harmful_rate:.2f}",
                    utility="-" if utility is None else f"{utility:.2f}",
                    refusal="-" if refusal is None else f"{refusal:.2f}",
                    cos=f"{-loss:.3f}",
                )
        finally:
            bar.close()
            for param in self.params.values():
                param.grad = None
                param.requires_grad_(False)
        if kept < len(records):
            ledger.undo(self.model, self.b, range(kept + 1, len(records) + 1))
        kept_record = records[kept - 1] if kept else None
        outcome = RunOutcome(
            rate=rate,
            steps=records,
            kept_step=kept,
            restored=ledger.net_total(kept),
            harmful_rate=kept_record.harmful_rate if kept_record else None,
            utility=kept_record.utility if kept_record else None,
            over_refusal=kept_record.over_refusal if kept_record else None,
            seconds=time.perf_counter() - start,
        )
        return outcome, ledger


def recover(
    aligned: str | Path,
    finetuned: str | Path,
    out: str | Path | None,
    *,
    harmful=None,
    task=None,
    eval_harmful=None,
    benign=None,
    refusal_rise: float = 0.05,
    layer: int | None = None,
    rate: float = 0.002,
    steps: int = 20,
    warmup: int | None = None,
    metric_drop: float = 0.05,
    rollback_rate: float = 0.2,
    judge: str = "keyword",
    metric: str = "exact_match",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    dry_run: bool = False,
    sweep: Sequence[float] = (),
    overwrite: bool = False,
    batch_size: int = 8,
    max_prompts: int | None = 256,
    max_shard_size: int | str = "2GB",
    eval_batch_size: int = 16,
    max_new_tokens: int = 48,
    progress: bool = True,
) -> RecoveryResult:
    """Restore the fine-tuned model's refusals by resetting a few weights to aligned values.

    ``aligned``: the aligned model folder. ``finetuned``: a model folder or a LoRA adapter on
    ``aligned``. ``harmful``: prompts for the harmful direction and its gradient (path,
    PromptSet or list; default: the bundled smoke set), the first ``max_prompts`` of them.
    ``eval_harmful``: prompts the harmful rate is measured on (default: ``harmful``).
    ``task``: held-out task examples with answers (path, TaskSet or list) that drive
    rollback; without them there is no rollback. ``benign``: benign prompts (path, PromptSet
    or list) whose over-refusal is checked with utility: a step also fails when it rises more
    than ``refusal_rise`` (absolute) above the higher of A's and B's. ``layer``: direction
    layer (default floor(4n/6), or n for models under 12 layers). ``warmup``: the first step
    that is checked (default 5, or 1 for models under 12 layers). ``rate``: share of decoder
    matrix elements restored per step (the paper's 0.002).
    ``sweep``: extra rates whose outcomes form the trade-off curve in the report.
    ``dtype``: working and output dtype (default: the fine-tuned checkpoint's).
    ``dry_run``: return the plan only; nothing is loaded or written. ``max_shard_size``:
    output shard size (writing a shard briefly needs its bytes again in memory).
    """
    start = time.perf_counter()
    a, b = open_pair(aligned, finetuned)
    lay = layout(b, layer)
    warmup = default_warmup(lay.n_layers) if warmup is None else warmup
    _check_settings(
        rate,
        steps,
        warmup,
        metric_drop,
        rollback_rate,
        sweep,
        batch_size,
        max_prompts,
        refusal_rise,
    )
    work_dtype = resolve_dtype(dtype)
    if work_dtype == "auto":
        work_dtype = checkpoint_dtype(b)
    harmful_set = prompt_set(harmful, "harmful")
    if max_prompts is not None and len(harmful_set) > max_prompts:
        harmful_set = PromptSet(
            harmful_set.prompts[:max_prompts], harmful_set.name, harmful_set.path
        )
    eval_set = prompt_set(eval_harmful, "eval_harmful") if eval_harmful is not None else harmful_set
    task_set = task_examples(task) if task is not None else None
    benign_set = prompt_set(benign, "benign") if benign is not None else None
    notes = []
    if task_set is None:
        notes.append(
            "no task data given: recovery runs without utility checks"
            + ("" if benign_set is not None else " or rollback")
        )
        warnings.warn(notes[-1], stacklevel=2)
    plan = Plan(
        aligned=str(a.path),
        finetuned=str(b.path),
        finetuned_is_adapter=b.is_adapter,
        n_layers=lay.n_layers,
        layer=lay.layer,
        dtype=str(work_dtype).removeprefix("torch."),
        rate=rate,
        steps=steps,
        warmup=warmup,
        restorable_tensors=len(lay.targets),
        restorable_params=lay.target_params,
        decoder_params=lay.decoder_params,
        per_step=lay.per_step(rate),
        candidates=None,
        rollback=task_set is not None or benign_set is not None,
        memory=memory_estimate(b, lay, work_dtype, lay.per_step(rate), steps),
    )
    settings = {
        "layer": lay.layer,
        "rate": rate,
        "steps": steps,
        "warmup": warmup,
        "metric_drop": metric_drop,
        "rollback_rate": rollback_rate,
        "refusal_rise": refusal_rise,
        "judge": judge,
        "metric": metric,
        "dtype": plan.dtype,
        "device": device or "cpu",
        "batch_size": batch_size,
        "max_prompts": max_prompts,
        "max_new_tokens": max_new_tokens,
        "sweep": list(sweep),
    }
    sets = {
        "harmful": _describe(harmful_set),
        "eval_harmful": _describe(eval_set),
        "task": _describe(task_set) if task_set is not None else None,
        "benign": _describe(benign_set) if benign_set is not None else None,
    }
    result = RecoveryResult(None, plan, settings=settings, sets=sets, warnings=notes)
    if dry_run:
        plan.candidates = count_candidates(a, b, lay, work_dtype)
        result.seconds = time.perf_counter() - start
        return result
    if out is None:
        raise ValueError("out is required unless dry_run is set")
    opts = {
        "steps": steps,
        "warmup": warmup,
        "metric_drop": metric_drop,
        "rollback_rate": rollback_rate,
        "refusal_rise": refusal_rise,
        "judge": judge,
        "metric": metric,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "max_new_tokens": max_new_tokens,
        "progress": progress,
    }
    with CheckpointWriter(
        out, source=b, overwrite=overwrite, inputs=[a], max_shard_size=max_shard_size
    ) as writer:
        session = _Session(
            a,
            b,
            lay,
            work_dtype,
            device,
            harmful_set.prompts,
            eval_set,
            task_set,
            benign_set,
            opts,
        )
        result.scores = session.references()
        for extra in sorted(set(sweep) - {rate}):
            outcome, ledger = session.run(extra, label=f"sweep rate={extra}")
            result.sweep.append(outcome.summary())
            ledger.undo(session.model, b, list(ledger.restored))
        outcome, _ = session.run(rate, label=f"recover rate={rate}")
        result.run = outcome
        if sweep:
            result.sweep = sorted([*result.sweep, outcome.summary()], key=lambda r: r["rate"])
        finetuned_scores = result.scores["finetuned"]
        result.scores["recovered"] = (
            {
                "harmful_rate": outcome.harmful_rate,
                "utility": outcome.utility,
                "over_refusal": outcome.over_refusal,
            }
            if outcome.kept_step
            else dict(finetuned_scores)
        )
        if outcome.kept_step == 0 and plan.rollback:
            result.warnings.append(
                "no step held after the warm-up: the output equals the fine-tuned model; "
                "try a smaller rate, a larger metric_drop or a larger rollback_rate"
            )
            warnings.warn(result.warnings[-1], stacklevel=2)
        for name in b.names():
            writer.add(name, _output_tensor(session.model, b, name))
        result.out = writer.out
        result.seconds = time.perf_counter() - start
        result.peak_rss_bytes = peak_rss_bytes()
        write_report(writer.folder / "report.json", result)
        writer.finish(model_card(result))
    return result


def _output_tensor(model, finetuned: Checkpoint, name: str) -> torch.Tensor:
    """The working model's tensor for ``name``; the file's for tensors the model lacks."""
    try:
        return model_tensor(model, name)
    except CheckpointError:
        return read(finetuned, name)


def prompt_set(source, role: str) -> PromptSet:
    """Prompts from a path, a PromptSet or a list of strings (None: the bundled harmful set)."""
    if source is None:
        from safealign.eval.smoke import SMOKE_HARMFUL

        source = SMOKE_HARMFUL
    if isinstance(source, (str, Path)):
        source = load_prompts(source)
    elif not isinstance(source, PromptSet):
        source = PromptSet.from_list([str(p) for p in source], name=role)
    if not source.prompts:
        raise ValueError(f"{role}: the prompt set is empty")
    return source


def task_examples(source) -> TaskSet:
    """Task examples from a path, a TaskSet or a list of dicts/objects with prompt and answer."""
    if isinstance(source, (str, Path)):
        source = load_task(source)
    elif not isinstance(source, TaskSet):
        examples = [
            TaskExample(e["prompt"], e["answer"])
            if isinstance(e, dict)
            else TaskExample(e.prompt, e.answer)
            for e in source
        ]
        source = TaskSet(examples, "task")
    if not source.examples:
        raise ValueError("task: the task set is empty")
    return source


def _describe(item) -> dict:
    return {"name": item.name, "n": len(item), "hash": item.hash}
