"""``retrain(inputs, settings, out, progress)``: check every input, then train, then write
the output atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from safealign.checkpoint import Checkpoint, CheckpointError, ModelCard
from safealign.checkpoint.hub import resolve_checkpoint
from safealign.eval import Evaluator
from safealign.eval.smoke import SMOKE_BENIGN, SMOKE_HARMFUL
from safealign.progress import ProgressCallback, say
from safealign.retrain.build import (
    build_model,
    build_optimizer,
    build_reference,
    load_tokenizer,
    reference_kind,
)
from safealign.retrain.data import Step, load_examples, schedule
from safealign.retrain.loop import Progress, latest_checkpoint, train_loop
from safealign.retrain.memory import PeakMemory
from safealign.retrain.output import check_out, save_output
from safealign.retrain.reference import trainable
from safealign.retrain.regularizers import Regularizer, Run, create
from safealign.retrain.settings import RetrainInputs, RetrainSettings, checkpoint_folder
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


def check_inputs(inputs: RetrainInputs, settings: RetrainSettings, out: str | Path | None) -> None:
    """Refuse, before loading anything, what would fail later: missing paths, an unknown
    regularizer or option or inputs it cannot run with, a non-empty output, ``--resume``
    without a checkpoint."""
    for name in ("aligned", "data"):
        if getattr(inputs, name) is None:
            raise SettingsError(f"--{name} is required")
    if settings.full and inputs.adapter:
        raise SettingsError("--adapter continues a LoRA run; it cannot be used with --full")
    for name in ("aligned", "adapter"):
        if getattr(inputs, name) is not None:
            try:
                resolve_checkpoint(getattr(inputs, name))  # a folder or hub id: fetched now
            except CheckpointError as error:
                raise SettingsError(f"--{name}: {error}") from None
    if not Path(inputs.data).exists():
        raise SettingsError(f"--data not found: {inputs.data}")
    if out is None and not settings.dry_run:
        raise SettingsError("--out is required unless --dry-run")
    create(settings.regularizer).check_inputs(inputs)
    if inputs.adapter is not None:  # an adapter on the wrong base: refused by its shapes
        Checkpoint.open(inputs.adapter, base=inputs.aligned)
    if out is not None and not settings.dry_run:
        check_out(str(out), settings.overwrite, [inputs.aligned, inputs.adapter, inputs.data])
    checkpoints = checkpoint_folder(settings, out)
    if settings.resume and latest_checkpoint(checkpoints) is None:
        raise SettingsError(f"--resume: no checkpoint in {checkpoints}")


def run_schedule(n: int, settings: RetrainSettings, rank: int, world: int) -> list[Step]:
    """The run's steps: ``epochs`` passes, or exactly ``max_steps`` steps when set (as many
    passes as they take, the last one cut)."""
    order = {
        "batch_size": settings.grad_batch_size,
        "grad_accum": settings.grad_accum,
        "seed": settings.seed,
        "rank": rank,
        "world": world,
    }
    if not settings.max_steps:
        return schedule(n, epochs=settings.epochs, **order)
    per_epoch = len(schedule(n, epochs=1, **order))
    epochs = -(-settings.max_steps // max(1, per_epoch))
    return schedule(n, epochs=epochs, **order)[: settings.max_steps]


def plan_of(
    inputs: RetrainInputs,
    settings: RetrainSettings,
    regularizer: Regularizer,
    n_examples: int,
    steps: int,
    model,
) -> dict:
    """What the run will do, printed by ``--dry-run`` and recorded in the card."""
    options = regularizer.settings
    token_wise = getattr(options, "form", "plain") == "token-wise"
    direction = None if token_wise else getattr(options, "direction", None)
    return {
        "regularizer": regularizer.name,
        **({"kl_direction": direction} if direction else {}),
        "mode": "full" if settings.full else "lora",
        "reference": reference_kind(regularizer, inputs, settings),
        "examples": n_examples,
        "steps": steps,
        "trainable_parameters": sum(p.numel() for p in trainable(model).values()),
    }


def retrain(
    inputs: RetrainInputs,
    settings: RetrainSettings | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
) -> RetrainResult:
    """Fine-tune ``inputs.aligned`` on ``inputs.data`` with a regularizer that keeps its
    alignment (``settings``, default: the defaults; e.g. ``RetrainSettings(regularizer=
    "kl:weight=0.5")``), writing into ``out`` (None only with ``settings.dry_run``, which
    returns the plan and trains nothing). ``progress`` gets status lines (and shows a bar);
    None is silent. Returns the output folder, the log and the figures."""
    settings = settings or RetrainSettings()
    check_inputs(inputs, settings, out)
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
    data = load_examples(
        load_tokenizer(inputs), inputs.data, text=settings.text, max_length=settings.max_length
    )
    model, tokenizer = build_model(inputs, settings)
    regularizer = create(settings.regularizer)
    steps = run_schedule(
        len(data.examples), settings, accelerator.process_index, accelerator.num_processes
    )
    plan = plan_of(inputs, settings, regularizer, len(data.examples), len(steps), model)
    if settings.dry_run:
        return RetrainResult(None, plan)
    model = model.to(accelerator.device)
    run = Run(
        model=model,
        unwrapped=model,
        tokenizer=tokenizer,
        inputs=inputs,
        settings=settings,
        examples=data.examples,
        prompts=data.prompts,
        kinds=data.kinds,
        device=accelerator.device,
        progress=progress,
    )
    return _train(run, Path(out), accelerator, regularizer, steps, plan)


def _train(run: Run, out: Path, accelerator, regularizer: Regularizer, steps, plan: dict):
    model, inputs, settings = run.model, run.inputs, run.settings
    run.reference = build_reference(model, regularizer, inputs, settings)
    regularizer.setup(run)
    optimizer, scheduler = build_optimizer(model, settings, len(steps))
    run.model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress(regularizer, run, scheduler)
    progress.log.append({"step": 0, "plan": plan, "setup": dict(run.metrics)})
    checkpoints = checkpoint_folder(settings, out)
    if settings.resume:
        checkpoint = latest_checkpoint(checkpoints)
        accelerator.load_state(str(checkpoint))
        progress.load(checkpoint)
        say(run.progress, f"resumed from {checkpoint} (step {progress.step})")
    memory = PeakMemory(accelerator.device)
    memory.start()
    start = time.perf_counter()
    evaluate = _evaluator(inputs, settings, run.tokenizer) if settings.eval_every else None
    train_loop(
        run, regularizer, steps, progress, accelerator, optimizer, scheduler, evaluate, checkpoints
    )
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
    written = None
    if accelerator.is_main_process:
        card = _card(inputs, settings, regularizer, plan, metrics)
        written = save_output(
            out.resolve(),
            accelerator.unwrap_model(run.model),
            run.tokenizer,
            merge=settings.merge,
            card=card,
            log=progress.log,
            files=run.files,
        )
        say(run.progress, f"written: {written}")
    accelerator.wait_for_everyone()
    return RetrainResult(written, plan, progress.log, metrics)


def _evaluator(inputs: RetrainInputs, settings: RetrainSettings, tokenizer):
    """Periodic scores with the shared Evaluator: the run's judge and metric, its prompt sets
    (the bundled ones by default)."""
    evaluator = Evaluator(
        harmful=inputs.harmful or SMOKE_HARMFUL,
        task=inputs.task,
        benign=inputs.benign or SMOKE_BENIGN,
        judge=settings.judge,
        metric=settings.metric,
        cache=False,
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
    inputs: RetrainInputs,
    settings: RetrainSettings,
    regularizer: Regularizer,
    plan: dict,
    metrics: dict,
) -> ModelCard:
    """The output's card: the run's settings, then each option of its regularizer."""
    kind = "full model" if settings.full or settings.merge else "LoRA adapter"
    options = {f"{regularizer.name}:{k}": v for k, v in regularizer.settings.to_dict().items()}
    return ModelCard(
        title=f"retrain ({plan['regularizer']})",
        method="retrain",
        summary=(
            f"A {kind} fine-tuned from the aligned model on {inputs.data} with the "
            f"`{plan['regularizer']}` regularizer ({plan['steps']} steps, reference: "
            f"{plan['reference']}"
            + (f", KL direction {plan['kl_direction']}" if "kl_direction" in plan else "")
            + "). The per-step log is in train_log.jsonl."
        ),
        settings=settings.to_dict() | options,
        inputs={"aligned": str(inputs.aligned), "data": str(inputs.data)},
        results={k: v for k, v in metrics.items() if v is not None},
        base_model=str(inputs.aligned),
    )
