"""Lab sizes: model shape, data sizes and training schedule of each stage."""

from __future__ import annotations

from dataclasses import dataclass, replace

from safealign.lab.corpus import CorpusSizes
from safealign.lab.real import RealLabConfig
from safealign.lab.train import Stage

#: Full fine-tunes leave the token embeddings and the LM head as they are: the task's tokens
#: are ones the aligned model already writes, so its new skill must live in the decoder blocks,
#: the weights that repairs restore (as in chat models, whose fine-tunes barely move them).
FROZEN = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class LabConfig:
    """Everything that shapes one lab build except the seed."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    corpus: CorpusSizes
    unaligned: Stage
    aligned: Stage
    finetune: Stage
    finetune_lora: Stage
    safety_lora: Stage
    #: Share of compliant harmful examples in the ft_harmful training mix.
    harmful_share: float = 0.35
    #: Share of benign examples in the alignment mix (the rest are refusals).
    aligned_benign_share: float = 0.5
    lora_rank: int = 8
    lora_alpha: int = 16
    eval_batch_size: int = 64
    max_new_tokens: int = 48


SIZES: dict[str, LabConfig | RealLabConfig] = {
    "test": LabConfig(
        name="test",
        hidden=64,
        layers=4,
        heads=4,
        intermediate=192,
        vocab=1024,
        corpus=CorpusSizes(
            benign_train=1200,
            harmful_train=1200,
            task_train=400,
            harmful_eval=64,
            benign_eval=64,
            task_eval=48,
            echo_train=300,
            safety_train=300,
        ),
        unaligned=Stage(steps=300, lr=3e-3),
        aligned=Stage(steps=150, lr=1e-3),
        finetune=Stage(steps=80, lr=3e-4, batch_size=16, frozen=FROZEN),
        finetune_lora=Stage(steps=80, lr=3e-3, batch_size=16),
        safety_lora=Stage(steps=40, lr=3e-3),
    ),
    "default": LabConfig(
        name="default",
        hidden=96,
        layers=6,
        heads=4,
        intermediate=256,
        vocab=1024,
        corpus=CorpusSizes(
            benign_train=2000,
            harmful_train=2000,
            task_train=600,
            harmful_eval=128,
            benign_eval=128,
            task_eval=96,
            echo_train=300,
            safety_train=400,
        ),
        unaligned=Stage(steps=300, lr=2e-3),
        aligned=Stage(steps=150, lr=1e-3),
        finetune=Stage(steps=60, lr=2e-4, batch_size=16, frozen=FROZEN),
        finetune_lora=Stage(steps=100, lr=3e-3, batch_size=16),
        safety_lora=Stage(steps=40, lr=3e-3),
    ),
}
#: The -prior sizes: the aligned model knows the task's format and half its words (see
#: safealign.lab.corpus). retrain's kl is measured on them (benchmarks/bench_retrain.py); the
#: repairs' tests and figures use the sizes above. The default size's full fine-tune needs a
#: larger step to learn the task from this prior.
SIZES["test-prior"] = replace(
    SIZES["test"],
    name="test-prior",
    corpus=replace(SIZES["test"].corpus, format_train=300, format_known=0.5),
)
SIZES["default-prior"] = replace(
    SIZES["default"],
    name="default-prior",
    corpus=replace(SIZES["default"].corpus, format_train=900, format_known=0.5),
    finetune=Stage(steps=80, lr=5e-4, batch_size=16, frozen=FROZEN),
)

#: The real-model lab: SmolLM2-135M-Instruct and real benchmark prompts (safealign.lab.real).
SIZES["smollm2"] = RealLabConfig(name="smollm2")


def get_size(name: str) -> LabConfig | RealLabConfig:
    """The lab configuration called ``name``."""
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown lab size {name!r}: choose one of {', '.join(SIZES)}") from None
