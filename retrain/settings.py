"""Settings of ``safealign retrain``: one dataclass for the CLI, the API, YAML and the card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from safealign.settings import Settings, SettingsError, setting

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RetrainInputs:
    """What a retraining run reads: ``aligned`` (A, a folder or hub id), the training
    ``data``, a LoRA ``adapter`` on A to continue (its frozen clone is the reference), the
    ``harmful`` and ``benign`` prompts (probe critic, anchors, periodic eval; the bundled sets
    by default) and the ``task`` set (prompt + answer) that ``eval_every`` scores."""

    aligned: str | Path
    data: str | Path
    adapter: str | Path | None = None
    harmful: str | Path | None = None
    benign: str | Path | None = None
    task: str | Path | None = None


@dataclass
class RetrainSettings(Settings):
    """Everything one retraining run needs but its inputs and the regularizer's options,
    which its own settings class holds (``--regularizer NAME:key=value,...``)."""

    RENAMED: ClassVar[dict[str, str]] = {"batch_size": "grad_batch_size"}

    text: bool = setting(
        False, help="Raw text data (a 'text' field or lines): loss on every token."
    )
    #: adaptive-kl by default: on the lab it is the one that kept alignment and task together
    #: (benchmarks/bench_retrain.py); kl with any fixed weight traded one for the other.
    regularizer: str = setting(
        "adaptive-kl",
        help="sft, kl, epoch-kl, adaptive-kl, der, l2, ema, ldifs, interleave; "
        "NAME:key=value,... with the keys under 'Regularizer options'.",
    )
    full: bool = setting(False, help="Full fine-tuning instead of LoRA.")
    merge: bool = setting(False, help="With LoRA: write the merged full model, not the adapter.")
    lora_rank: int = setting(8, help="LoRA rank.", min=1)
    lora_alpha: float = setting(16.0, help="LoRA alpha (scale alpha / rank).", min=0, min_open=True)
    lora_targets: tuple[str, ...] = setting(LORA_TARGETS, help="LoRA target module names.")
    epochs: int = setting(3, help="Passes over the data.", min=1)
    max_steps: int = setting(
        0,
        help="Train exactly N optimiser steps, the data repeated as needed (overrides --epochs; "
        "0: off).",
        min=0,
    )
    lr: float = setting(2e-4, help="Peak learning rate.", min=0, min_open=True)
    warmup: float = setting(0.1, help="Share of steps of linear warm-up.", min=0, max=1)
    weight_decay: float = setting(0.0, help="AdamW weight decay.", min=0)
    max_grad_norm: float = setting(1.0, help="Gradient clipping norm (0: off).", min=0)
    grad_batch_size: int = setting(8, help="Examples per micro-batch (per process).", min=1)
    grad_accum: int = setting(1, help="Micro-batches per optimiser step.", min=1)
    max_length: int = setting(512, help="Tokens per example; longer replies are cut.", min=2)
    seed: int = setting(0, help="Seed of data order, initialisation and dropout.", min=0)
    mixed_precision: str = setting(
        "no", help="accelerate mixed precision.", choices=("no", "fp16", "bf16")
    )
    dtype: str = setting("float32", help="Weights dtype (float32, bfloat16, float16).")
    cpu: bool = setting(False, help="Train on the CPU even when an accelerator is present.")
    judge: str = setting(
        "keyword", help="--eval-every's harmful-response judge, NAME:key=value.", group="Eval"
    )
    metric: str = setting("exact_match", help="--eval-every's task metric, NAME:key=value.")
    eval_every: int = setting(
        0, help="Score with the shared Evaluator every N steps (0: off).", min=0
    )
    save_every: int = setting(0, help="save_state checkpoint every N steps (0: off).", min=0)
    checkpoint_dir: str | None = setting(
        None, help="Checkpoints folder.", path=True, default_text="OUT.checkpoints"
    )
    resume: bool = setting(False, help="Continue from the latest checkpoint.")
    overwrite: bool = setting(False, help="Replace a non-empty --out folder.")
    dry_run: bool = setting(False, help="Check inputs and print the plan; train nothing.")

    def check(self) -> None:
        super().check()
        if self.full and self.merge:
            raise SettingsError("--merge applies to LoRA; --full already writes a full model")


def checkpoint_folder(settings: RetrainSettings, out: str | Path | None) -> str | None:
    """Where ``save_state`` checkpoints go: ``checkpoint_dir``, else ``OUT.checkpoints``."""
    if settings.checkpoint_dir:
        return settings.checkpoint_dir
    return f"{str(out).rstrip('/')}.checkpoints" if out is not None else None
