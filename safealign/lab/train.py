"""A small supervised chat training loop: loss on reply tokens only, AdamW, cosine schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safealign.chat import IGNORE, collate, encode_pairs
from safealign.retrain.build import lr_factor

#: The lab's schedule decays to a tenth of the peak learning rate.
LR_FLOOR = 0.1


@dataclass(frozen=True)
class Stage:
    """One training run: optimiser steps, batch size and peak learning rate."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.0
    #: Parameters left as they are: those whose name contains one of these strings.
    frozen: tuple[str, ...] = ()


def example_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy averaged over each example's reply, then over examples, so a
    short reply (a task answer, a refusal) weighs as much as a long one.

    Logits are computed from the position before the batch's first reply token on
    (``logits_to_keep``): the prompt's vocabulary-wide rows would never be used (on
    SmolLM2's alignment data this cuts a step's time by about an eighth)."""
    labels = batch["labels"]
    trained = (labels != IGNORE).any(dim=0)
    start = max(int(trained.int().argmax()) - 1, 0) if trained.any() else 0
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=labels.shape[1] - start,
    ).logits
    targets = labels[:, start + 1 :]
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE, reduction="none"
    )
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counts).mean()


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of shuffled index batches; the last partial batch is dropped.

    Batches are not grouped by length: that would cut padding, but batches holding one kind
    of example slowed learning the copy skill several-fold in the lab.
    """
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train(model, tokenizer, pairs: Sequence, stage: Stage, *, seed: int) -> list[float]:
    """Train ``model`` in place on ``pairs``; return the loss of every step.

    Batches come epoch by epoch from :func:`epoch_batches` seeded by ``seed``; only
    parameters with ``requires_grad`` are updated (so a PEFT model trains its adapter only),
    and none whose name contains one of ``stage.frozen``.
    """
    if len(pairs) < stage.batch_size:
        raise ValueError(
            f"{len(pairs)} training examples, fewer than a batch of {stage.batch_size}"
        )
    encoded = encode_pairs(tokenizer, pairs)
    generator = torch.Generator().manual_seed(seed)
    frozen = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and any(part in name for part in stage.frozen)
    ]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, stage.steps, stage.warmup, LR_FLOOR)
    )
    model.train()
    batches: list[list[int]] = []
    losses = []
    for _ in range(stage.steps):
        if not batches:
            batches = epoch_batches(len(encoded), stage.batch_size, generator)
        batch = batches.pop()
        loss = example_loss(model, collate([encoded[i] for i in batch], tokenizer.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return losses
