"""Settings of ``safealign retrain``: one dataclass for the CLI, the API, YAML and the card."""

from __future__ import annotations

from dataclasses import dataclass

from safealign.settings import Settings, SettingsError, setting

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RetrainSettings(Settings):
    """Everything one retraining run needs; regularizer options are read by the regularizer."""

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
        help="sft, kl, epoch-kl, adaptive-kl, der, l2, ema, ldifs, interleave; NAME:key=value,...",
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
    #: kl's weight and direction (benchmarks/results/retrain_direction_*.json, retrain_kl_weight_*):
    #: on the -prior labs, where A gives the task's answers 0.55-0.6, reverse KL at 0.75 takes
    #: harmful 100% -> 0% with task kept (over-refusal 0.8% default-prior, 88% test-prior); 0.4
    #: leaves default-prior 100% harmful and 0.5 is at that edge. Forward KL lowers harm only as
    #: it costs the task (1.25: 30% harmful task -4 / 17% -12). On the plain labs A rules the
    #: task's answers out as firmly as the harmful "Sure" (lab_prior.json): no setting separates
    #: them (reverse 0.5-0.75: 0-2% harmful, 1-12% task; forward 0.5: 95-98% harmful).
    kl_weight: float = setting(
        0.75, help="kl plain: lambda of NLL + lambda KL.", min=0, group="Reg"
    )
    kl_direction: str | None = setting(
        None,
        help="kl plain, adaptive-kl, epoch-kl: KL(p || p_ref) (reverse) or KL(p_ref || p).",
        choices=("forward", "reverse"),
        default_text="reverse for kl and epoch-kl, forward for adaptive-kl",
    )
    #: plain: Qi et al.'s token-wise form leaves every lab 100% harmful, the plain ones with 2-5%
    #: task (the task's answers lie in its beta 2 window; the harmful switch is one token at 0.5).
    kl_form: str = setting(
        "plain",
        help="kl: plain (NLL + lambda KL) or token-wise (Qi et al. 2025, beta_t by position).",
        choices=("plain", "token-wise"),
    )
    kl_betas: tuple[float, ...] = setting(
        (0.5, 2.0, 2.0, 2.0, 2.0, 0.1),
        help="kl token-wise: beta_t of reply tokens 1, 2, ...; the last for all later ones.",
        min=0,
        min_open=True,
    )
    kl_chunk: int = setting(
        0, help="Tokens per chunk of the vocabulary-wide KL (0: 2^24 floats' worth).", min=0
    )
    gamma: float = setting(0.5, help="epoch-kl: weight gamma^epoch of KL to last epoch.", min=0)
    #: A-Reg's range: beta in [0.1, 0.9] (the paper's clamp); on the lab: 0% harmful, task kept.
    beta_min: float = setting(0.1, help="adaptive-kl: beta at critic score 0.", min=0, max=1)
    beta_max: float = setting(0.9, help="adaptive-kl: beta at critic score 1.", min=0, max=1)
    critic_ema: float = setting(0.0, help="adaptive-kl: EMA factor of critic scores.", min=0, max=1)
    critic: str = setting("probe", help="adaptive-kl critic: probe or judge:NAME.")
    layers: tuple[int, ...] = setting(
        (), help="Layers for the probe and ldifs (hidden-state indices) [all / 5 spread].", min=0
    )
    replay_data: str | None = setting(
        None,
        help="der: anchor data (prompt/response) [A's greedy replies to --harmful].",
        path=True,
    )
    #: 10: on the test lab alpha 1 leaves 95% harmful, 10 and 100 give 0% (task 100% / 97.9%).
    replay_weight: float = setting(10.0, help="der: alpha of alpha MSE(logits, ref).", min=0)
    replay_ce: float = setting(0.0, help="der: beta of DER++ cross-entropy on anchors.", min=0)
    l2_weight: float = setting(0.1, help="l2: mu of mu ||theta - theta_A||^2.", min=0)
    ema_decay: float = setting(0.99, help="ema: decay of the parameter average.", min=0, max=1)
    interleave_share: float = setting(
        0.05,
        help="interleave: share of anchor examples in the training mix.",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
    )
    ldifs_weight: float = setting(1.0, help="ldifs: weight of the feature distance.", min=0)
    harmful: str | None = setting(
        None, help="Harmful prompts (probe, replay, eval) [bundled set].", path=True, group="Eval"
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
        if self.beta_min > self.beta_max:
            raise SettingsError(f"--beta-min {self.beta_min} is above --beta-max {self.beta_max}")

    @property
    def checkpoints(self) -> str | None:
        """Where ``save_state`` checkpoints go."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        return f"{self.out.rstrip('/')}.checkpoints" if self.out else None
