"""The training loop, nanoGPT-style, on accelerate.

Each optimiser step takes its micro-batches (from :func:`safealign.retrain.data.schedule`),
sums every micro-batch's loss over its trained tokens and divides by the step's *global*
count of trained tokens (all micro-batches, all processes): gradient accumulation and the
number of processes then leave the loss unchanged. Gradients are synchronised on the last
micro-batch only. ``save_state`` checkpoints hold model, optimiser, RNG and :class:`Progress`
(step, log, regularizer and reference state); the data order is a function of the seed.
"""

from __future__ import annotations

import inspect
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safealign.chat import IGNORE, collate
from safealign.retrain.data import Step
from safealign.retrain.divergence import trained_mask
from safealign.retrain.regularizers import Regularizer, Run

CHECKPOINT_PREFIX = "step-"
PROGRESS = "progress.json"
TENSORS = "progress.safetensors"


@dataclass
class Progress:
    """What a checkpoint holds beyond accelerate's state (model, optimiser, RNG): the step,
    the log, the schedule, the regularizer's state and a moving reference's snapshot.
    Tensors go to progress.safetensors, the rest to progress.json: nothing is pickled."""

    regularizer: Regularizer
    run: Run
    scheduler: object
    step: int = 0
    log: list[dict] = field(default_factory=list)

    def state(self) -> dict:
        reference = self.run.reference
        mutable = reference is not None and self.regularizer.snapshot
        return {
            "step": self.step,
            "log": self.log,
            "scheduler": self.scheduler.state_dict(),
            "regularizer": self.regularizer.state_dict(),
            "reference": reference.state_dict() if mutable else {},
        }

    def save(self, folder: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        plain = _split(self.state(), "", tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS))
        (folder / PROGRESS).write_text(json.dumps(plain, default=float) + "\n")

    def load(self, folder: Path) -> None:
        tensors = load_file(str(folder / TENSORS))
        state = _join(json.loads((folder / PROGRESS).read_text()), tensors)
        self.step, self.log = int(state["step"]), state["log"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.regularizer.load_state_dict(state["regularizer"])
        if state["reference"]:
            self.run.reference.load_state_dict(state["reference"])


def _split(value, key: str, tensors: dict):
    """Tensors replaced by ``{"__tensor__": key}`` (collected in ``tensors``)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {k: _split(v, f"{key}/{k}", tensors) for k, v in value.items()}
    return value


def _join(value, tensors: dict):
    if isinstance(value, dict) and set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict):
        return {k: _join(v, tensors) for k, v in value.items()}
    return value


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The checkpoint of the highest step in ``folder``, or None."""
    if folder is None or not Path(folder).is_dir():
        return None
    found = sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}*"))
    found = [f for f in found if (f / PROGRESS).is_file()]
    return found[-1] if found else None


def keeps_logits(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def logits_start(run: Run, regularizer: Regularizer, labels: torch.Tensor) -> int:
    """The first position whose next token is trained in any example of the batch: logits
    before it are never used, so the forward passes skip them (``logits_to_keep``). 0 when
    the regularizer reads hidden states (aligned with the whole sequence) or the model does
    not take ``logits_to_keep``."""
    keep = trained_mask(labels).any(0)
    if regularizer.hidden or not keep.any() or not keeps_logits(run.unwrapped):
        return 0
    return int(keep.int().argmax())


def micro_step(run: Run, regularizer: Regularizer, inputs: dict, scale: float, accelerator):
    """Forward, loss and backward of one micro-batch; returns its loss sum and stats.

    Logits are computed from the first trained position on (model and reference alike), and
    the regularizer sees ``labels`` cut to match, so a long shared prompt costs no
    vocabulary-wide rows."""
    start = logits_start(run, regularizer, inputs["labels"])
    keep = inputs["input_ids"].shape[1] - start if start else 0
    out = run.model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        output_hidden_states=regularizer.hidden,
        **({"logits_to_keep": keep} if keep else {}),
    )
    ref = None
    if regularizer.reference and regularizer.batch_reference:
        ref = run.reference.forward(inputs, hidden=regularizer.hidden, logits_to_keep=keep)
    cut = inputs | {"labels": inputs["labels"][:, start:]}
    loss, stats = regularizer.loss(run, cut, out, ref)
    accelerator.backward(loss * scale)
    return loss.detach(), stats


def train_step(run: Run, regularizer, step: Step, accelerator, optimizer, scheduler) -> dict:
    """One optimiser step over ``step``'s micro-batches; returns the logged row."""
    batches = [
        collate([run.examples[i] for i in idx], run.tokenizer.pad_token_id) for idx in step.micro
    ]
    local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = accelerator.reduce(torch.tensor(float(local), device=run.device), "sum").item()
    scale = accelerator.num_processes / max(total, 1.0)
    loss_sum, rows = 0.0, []
    for k, (idx, batch) in enumerate(zip(step.micro, batches, strict=True)):
        inputs = {key: value.to(run.device) for key, value in batch.items()}
        inputs["index"] = torch.tensor(idx)
        last = k == len(batches) - 1
        with nullcontext() if last else accelerator.no_sync(run.model):
            loss, stats = micro_step(run, regularizer, inputs, scale, accelerator)
        loss_sum += loss.item()
        rows.append(stats)
    if run.settings.max_grad_norm > 0:
        accelerator.clip_grad_norm_(
            [p for p in run.model.parameters() if p.requires_grad], run.settings.max_grad_norm
        )
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    regularizer.after_step(run)
    loss_sum = accelerator.reduce(torch.tensor(loss_sum, device=run.device), "sum").item()
    means = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}
    return {
        "epoch": step.epoch,
        "loss": loss_sum / max(total, 1.0),
        "lr": lr,
        "tokens": total,
        **means,
    }


def train_loop(
    run: Run,
    regularizer: Regularizer,
    steps: list[Step],
    progress: Progress,
    accelerator,
    optimizer,
    scheduler,
    evaluate=None,
    checkpoints: str | None = None,
) -> None:
    """Run the steps from ``progress.step`` on; checkpoint (into ``checkpoints``) and evaluate
    as the settings say; a progress bar with ``run.progress``."""
    settings = run.settings
    bar = None
    if run.progress is not None and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), initial=progress.step, desc=regularizer.name, leave=False)
    epoch = None
    for index in range(progress.step, len(steps)):
        step = steps[index]
        if step.epoch != epoch:
            epoch = step.epoch
            regularizer.on_epoch_start(run, epoch)
        start = time.perf_counter()
        row = train_step(run, regularizer, step, accelerator, optimizer, scheduler)
        row = {"step": index + 1, **row, "seconds": time.perf_counter() - start}
        progress.step = index + 1
        if (
            evaluate is not None
            and settings.eval_every
            and progress.step % settings.eval_every == 0
        ):
            row["eval"] = evaluate(run)
        progress.log.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "kl", "beta") if k in row})
        if settings.save_every and progress.step % settings.save_every == 0:
            save_checkpoint(accelerator, checkpoints, progress)
    if bar is not None:
        bar.close()


def save_checkpoint(accelerator, folder: str, progress: Progress) -> Path:
    """``save_state`` into ``folder/step-NNNNNN``; progress.json, written last, marks it whole."""
    path = Path(folder) / f"{CHECKPOINT_PREFIX}{progress.step:06d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        progress.save(path)
    accelerator.wait_for_everyone()
    return path
