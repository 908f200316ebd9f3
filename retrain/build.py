"""Model, reference, optimiser and schedule of a run."""

from __future__ import annotations

import math
import warnings

import torch

from safealign.checkpoint.hub import resolve_checkpoint
from safealign.model import load_model
from safealign.paths import has_tokenizer
from safealign.retrain.reference import Reference, trainable
from safealign.retrain.regularizers import Regularizer
from safealign.retrain.settings import RetrainInputs, RetrainSettings


def load_tokenizer(inputs: RetrainInputs):
    """The tokenizer the run uses (the adapter's when it has one), loaded alone so the data
    is checked before any weights are read."""
    from transformers import AutoTokenizer

    source = resolve_checkpoint(inputs.aligned)
    if inputs.adapter and has_tokenizer(adapter := resolve_checkpoint(inputs.adapter)):
        source = adapter
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(inputs: RetrainInputs, settings: RetrainSettings):
    """The model to train and its tokenizer: a fresh LoRA on A, A's loaded adapter made
    trainable (``--adapter``), or A itself (``--full``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tokenizer = load_model(inputs.aligned, dtype=settings.dtype)
    if settings.full:
        model.requires_grad_(True)
    elif inputs.adapter:
        adapter = str(resolve_checkpoint(inputs.adapter))
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    else:
        torch.manual_seed(settings.seed)
        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(settings.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():  # peft calls a deprecated transformers property
            warnings.filterwarnings("ignore", category=FutureWarning)
            model = get_peft_model(model, config)
    model.train()
    return model, tokenizer


def reference_kind(
    regularizer: Regularizer, inputs: RetrainInputs, settings: RetrainSettings
) -> str:
    """``none``, ``adapter-off`` (no copy) or ``snapshot`` (frozen trainable tensors)."""
    if not regularizer.reference:
        return "none"
    if settings.full or inputs.adapter or regularizer.snapshot:
        return "snapshot"
    return "adapter-off"


def build_reference(
    model, regularizer: Regularizer, inputs: RetrainInputs, settings: RetrainSettings
):
    """The reference the regularizer needs (see :func:`reference_kind`), or None."""
    kind = reference_kind(regularizer, inputs, settings)
    if kind == "none":
        return None
    return Reference.frozen(model) if kind == "snapshot" else Reference.adapter_off(model)


def lr_factor(step: int, total: int, warmup: float, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to ``floor`` of the peak."""
    warm = max(1, round(total * warmup)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return floor + (1 - floor) / 2 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, settings: RetrainSettings, total_steps: int):
    """AdamW on the trainable parameters and its warm-up + cosine schedule."""
    params = list(trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, settings.warmup)
    )
    return optimizer, scheduler
