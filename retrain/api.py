"""``retrain(...)``: check every input, then train, then write the output atomically."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safealign.checkpoint import Checkpoint, CheckpointError, ModelCard
from safealign.checkpoint.hub import resolve_checkpoint
from safealign.eval import Evaluator
from safealign.eval.smoke import SMOKE_BENIGN, SMOKE_HARMFUL
from safealign.retrain.build import (
    build_model,
    build_optimizer,
    build_reference,
    load_tokenizer,
    reference_kind,
)
from safealign.retrain.data import load_examples, schedule
from safealign.retrain.loop import Progress, latest_checkpoint, train_loop
from safealign.retrain.memory import PeakMemory
from safealign.retrain.output import check_out, save_output
from safealign.retrain.reference import trainable
from safealign.retrain.regularizers import OLD_NAMES, Regularizer, Run, create, resolve, upgrade
from safealign.retrain.settings import RetrainSettings
from safealign.settings import SettingsError


@dataclass
class RetrainResult:
    """What a run produced: the output folder (None for a dry run), its log and figures."""

    out: Path | None
    plan: dict
    log: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    @property
    def steps(self) -> list[dict]:
        """The log's step rows (row 0 holds the plan and the setup figures)."""
        return [row for row in self.log if row["step"] > 0]


def check_inputs(settings: RetrainSettings) -> None:
    """Refuse, before loading anything, what would fail later: missing paths, an unknown
    regularizer or option, a non-empty output, ``--resume`` without a checkpoint."""
    for name in ("aligned", "data"):
        if getattr(settings, name) is None:
            raise SettingsError(f"--{name} is required")
    for name in ("aligned", "adapter"):
        if getattr(settings, name) is not None:
            try:
                resolve_checkpoint(getattr(settings, name))  # a folder or hub id: fetched now
            except CheckpointError as error:
                raise SettingsError(f"--{name}: {error}") from None
    if not Path(settings.data).exists():
        raise SettingsError(f"--data not found: {settings.data}")
    if settings.out is None and not settings.dry_run:
        raise SettingsError("--out is required unless --dry-run")
    resolve(settings.regularizer)
    if settings.adapter is not None:  # an adapter on the wrong base: refused by its shapes
        Checkpoint.open(settings.adapter, base=settings.aligned)
    if settings.out is not None and not settings.dry_run:
        inputs = [settings.aligned, settings.adapter, settings.data]
        check_out(settings.out, settings.overwrite, inputs)
    if settings.resume and latest_checkpoint(settings.checkpoints) is None:
        raise SettingsError(f"--resume: no checkpoint in {settings.checkpoints}")


def plan_of(
    settings: RetrainSettings, regularizer: Regularizer, n_examples: int, steps: int, model
) -> dict:
    """What the run will do, printed by ``--dry-run`` and recorded in the card."""
    options = regularizer.settings
    token_wise = getattr(options, "form", "plain") == "token-wise"
    direction = None if token_wise else getattr(options, "direction", None)
    return {
        "regularizer": regularizer.name,
        **({"kl_direction": direction} if direction else {}),
        "mode": "full" if settings.full else "lora",
        "reference": reference_kind(regularizer, settings),
        "examples": n_examples,
        "steps": steps,
        "trainable_parameters": sum(p.numel() for p in trainable(model).values()),
    }


def retrain(
    settings: RetrainSettings | None = None, *, log: Callable[[str], None] = print, **options
) -> RetrainResult:
    """Fine-tune ``aligned`` on ``data`` with a regularizer that keeps its alignment.

    Pass a :class:`RetrainSettings` or its fields as keywords (``retrain(aligned=..., data=...,
    out=..., regularizer="kl:weight=0.5")``). Returns the output folder, the log and the
    figures. A regularizer option under its former name (``kl_weight=0.5``) still works for
    one release, with a DeprecationWarning."""
    old = {key: options.pop(key) for key in list(options) if key in OLD_NAMES}
    settings = (settings or RetrainSettings()).replace(**options)
    if old:
        settings = settings.replace(regularizer=upgrade(settings.regularizer, old))
    check_inputs(settings)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    try:
        accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=settings.cpu)
    except ValueError as error:  # accelerate's state is one per process
        raise SettingsError(
            f"--mixed-precision {settings.mixed_precision} / --cpu: this process already runs "
            "accelerate with other settings; use one process per setting"
        ) from error
    set_seed(settings.seed)
    examples, prompts = load_examples(
        load_tokenizer(settings), settings.data, text=settings.text, max_length=settings.max_length
    )
    model, tokenizer = build_model(settings)
    regularizer = create(settings.regularizer)
    steps = schedule(
        len(examples),
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        epochs=settings.epochs,
        seed=settings.seed,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    plan = plan_of(settings, regularizer, len(examples), len(steps), model)
    if settings.dry_run:
        log(" ".join(f"{k}={v}" for k, v in plan.items()))
        return RetrainResult(None, plan)
    data = (examples, prompts)
    return _train(settings, accelerator, model, tokenizer, data, regularizer, steps, plan, log)


def _train(settings, accelerator, model, tokenizer, data, regularizer, steps, plan, log):
    model = model.to(accelerator.device)
    run = Run(
        model=model,
        unwrapped=model,
        tokenizer=tokenizer,
        settings=settings,
        examples=data[0],
        prompts=data[1],
        device=accelerator.device,
        log=log,
    )
    run.reference = build_reference(model, regularizer, settings)
    regularizer.setup(run)
    optimizer, scheduler = build_optimizer(model, settings, len(steps))
    run.model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress(regularizer, run, scheduler)
    progress.log.append({"step": 0, "plan": plan, "setup": dict(run.metrics)})
    if settings.resume:
        checkpoint = latest_checkpoint(settings.checkpoints)
        accelerator.load_state(str(checkpoint))
        progress.load(checkpoint)
        log(f"resumed from {checkpoint} (step {progress.step})")
    memory = PeakMemory(accelerator.device)
    memory.start()
    start = time.perf_counter()
    evaluate = _evaluator(settings, tokenizer) if settings.eval_every else None
    train_loop(run, regularizer, steps, progress, accelerator, optimizer, scheduler, evaluate)
    seconds = time.perf_counter() - start
    regularizer.finish(run)
    trained = [row["seconds"] for row in progress.log if "seconds" in row]
    metrics = {
        **run.metrics,
        "train_seconds": seconds,
        "step_seconds": sorted(trained)[len(trained) // 2] if trained else None,
        "peak_memory_bytes": memory.bytes(),
        "reference_bytes": run.reference.nbytes if run.reference else 0,
        "final_loss": progress.log[-1].get("loss"),
    }
    out = None
    if accelerator.is_main_process:
        card = _card(settings, regularizer, plan, metrics)
        out = save_output(
            Path(settings.out).resolve(),
            accelerator.unwrap_model(run.model),
            tokenizer,
            merge=settings.merge,
            card=card,
            log=progress.log,
            files=run.files,
        )
        log(f"written: {out}")
    accelerator.wait_for_everyone()
    return RetrainResult(out, plan, progress.log, metrics)


def _evaluator(settings: RetrainSettings, tokenizer):
    """Periodic scores with the shared Evaluator: the run's judge and metric, its prompt sets
    (the bundled ones by default)."""
    evaluator = Evaluator(
        harmful=settings.harmful or SMOKE_HARMFUL,
        task=settings.task,
        benign=settings.benign or SMOKE_BENIGN,
        judge=settings.judge,
        metric=settings.metric,
        use_cache=False,
    )

    def evaluate(run: Run) -> dict:
        scores = evaluator.score(run.unwrapped, tokenizer)
        return {
            "harmful_rate": scores.harmful_rate,
            "utility": scores.utility,
            "over_refusal": scores.over_refusal,
        }

    return evaluate


def _card(
    settings: RetrainSettings, regularizer: Regularizer, plan: dict, metrics: dict
) -> ModelCard:
    """The output's card: the run's settings, then each option of its regularizer."""
    kind = "full model" if settings.full or settings.merge else "LoRA adapter"
    options = {f"{regularizer.name}:{k}": v for k, v in regularizer.settings.to_dict().items()}
    return ModelCard(
        title=f"retrain ({plan['regularizer']})",
        method="retrain",
        summary=(
            f"A {kind} fine-tuned from the aligned model on {settings.data} with the "
            f"`{plan['regularizer']}` regularizer ({plan['steps']} steps, reference: "
            f"{plan['reference']}"
            + (f", KL direction {plan['kl_direction']}" if "kl_direction" in plan else "")
            + "). The per-step log is in train_log.jsonl."
        ),
        settings=settings.to_dict() | options,
        inputs={"aligned": str(settings.aligned), "data": str(settings.data)},
        results={k: v for k, v in metrics.items() if v is not None},
        base_model=str(settings.aligned),
    )
