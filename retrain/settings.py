"""Settings of ``safealign retrain``: one dataclass for the CLI, the API, YAML and the card."""

from __future__ import annotations

from dataclasses import dataclass

from safealign.settings import Settings, SettingsError, setting

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RetrainSettings(Settings):
    """Everything one retraining run needs but the regularizer's options, which its own
    settings class holds (``--regularizer NAME:key=value,...``)."""

    aligned: str | None = setting(None, help="Aligned model folder (A).", path=True, group="Inputs")
    data: str | None = setting(
        None, help="Training data: prompt/response or chat messages (JSONL, JSON, CSV).", path=True
    )
    out: str | None = setting(None, help="Output folder. Required unless --dry-run.", path=True)
    adapter: str | None = setting(
        None,
        help="Continue from this LoRA adapter on A (its frozen clone is the reference).",
        path=True,
    )
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
    lr: float = setting(2e-4, help="Peak learning rate.", min=0, min_open=True)
    warmup: float = setting(0.1, help="Share of steps of linear warm-up.", min=0, max=1)
    weight_decay: float = setting(0.0, help="AdamW weight decay.", min=0)
    max_grad_norm: float = setting(1.0, help="Gradient clipping norm (0: off).", min=0)
    batch_size: int = setting(
        8, help="Examples per micro-batch (per process).", min=1, flag="--grad-batch-size"
    )
    grad_accum: int = setting(1, help="Micro-batches per optimiser step.", min=1)
    max_length: int = setting(512, help="Tokens per example; longer replies are cut.", min=2)
    seed: int = setting(0, help="Seed of data order, initialisation and dropout.", min=0)
    mixed_precision: str = setting(
        "no", help="accelerate mixed precision.", choices=("no", "fp16", "bf16")
    )
    dtype: str = setting("float32", help="Weights dtype (float32, bfloat16, float16).")
    cpu: bool = setting(False, help="Train on the CPU even when an accelerator is present.")
    harmful: str | None = setting(
        None, help="Harmful prompts (probe, anchors, eval) [bundled set].", path=True, group="Eval"
    )
    benign: str | None = setting(None, help="Benign prompts (probe, eval) [bundled].", path=True)
    task: str | None = setting(None, help="Task set (prompt + answer) for --eval-every.", path=True)
    judge: str = setting("keyword", help="--eval-every's harmful-response judge, NAME:key=value.")
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
    progress: bool = setting(True, help="Show a progress bar.", cli=False)

    def check(self) -> None:
        super().check()
        if self.full and self.merge:
            raise SettingsError("--merge applies to LoRA; --full already writes a full model")
        if self.full and self.adapter:
            raise SettingsError("--adapter continues a LoRA run; it cannot be used with --full")

    @property
    def checkpoints(self) -> str | None:
        """Where ``save_state`` checkpoints go."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        return f"{self.out.rstrip('/')}.checkpoints" if self.out else None
