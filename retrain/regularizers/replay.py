"""der (seed 003's best): logit replay on safety anchor data, DER++ optionally."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safealign.chat import collate, encode_pairs
from safealign.data import ChatPair, load_pairs
from safealign.eval import generate
from safealign.progress import say
from safealign.retrain.data import held_apart
from safealign.retrain.divergence import shift
from safealign.retrain.regularizers.base import (
    Regularizer,
    RegularizerSettings,
    Run,
    nll_rows,
    per_step,
)
from safealign.settings import setting

#: Harmful prompts answered by the reference to make the default anchor set.
ANCHOR_PROMPTS = 256
ANCHOR_NEW_TOKENS = 48


def anchors_setting() -> str | None:
    """The anchor data option of der and interleave."""
    return setting(
        None,
        help="Anchor data (prompt/response); pairs whose prompt is in --data are dropped.",
        path=True,
        default_text="A's greedy replies to --harmful",
        old_name="replay_data",
    )


def anchor_pairs(run: Run, anchors: str | None, needed_by: str) -> tuple[list[ChatPair], int]:
    """The pairs in file ``anchors``, or the reference's own greedy replies to the harmful
    prompts; either way none whose prompt is a fine-tune prompt. Returns the pairs and how
    many prompts were dropped for that.

    Called before the first step, when the model still equals its reference (a fresh LoRA,
    the loaded adapter, the full model), so the model generates them itself."""
    taken = set(run.prompts)
    if anchors:
        pairs = load_pairs(anchors)
        kept = [p for p in pairs if p.prompt not in taken]
        return kept, len(pairs) - len(kept)
    prompts, dropped = held_apart(run.inputs.harmful, "harmful", taken, needed_by)
    prompts = prompts[:ANCHOR_PROMPTS]
    replies = generate(
        run.unwrapped, run.tokenizer, prompts, max_new_tokens=ANCHOR_NEW_TOKENS, batch_size=32
    )
    pairs = [ChatPair(p, r) for p, r in zip(prompts, replies, strict=True) if r.strip()]
    return pairs, dropped


class Anchored(Regularizer):
    """Base of the regularizers that draw safety anchors: the anchor set (written beside the
    output as replay.jsonl) and a seeded cyclic order over ``self.pool`` (all anchors unless a
    subclass narrows it); how many were drawn is part of the state."""

    def __init__(self, settings: RegularizerSettings | None = None):
        super().__init__(settings)
        self.drawn = 0
        self.anchors: list = []
        self.pairs: list[ChatPair] = []
        self.pool: list[int] = []

    def setup(self, run: Run) -> None:
        self.pairs = self.candidates(run)
        if not self.pairs:
            raise ValueError(
                f"{self.name}: no anchor examples (every reply was empty, or every prompt is "
                "a fine-tune prompt)"
            )
        encoded = encode_pairs(run.tokenizer, self.pairs)
        self.anchors = [(ids[: run.settings.max_length], s) for ids, s in encoded]
        self.pool = list(range(len(self.anchors)))
        self.seed, self.size = run.settings.seed, run.settings.grad_batch_size
        lines = [json.dumps({"prompt": p.prompt, "response": p.response}) for p in self.pairs]
        run.files["replay.jsonl"] = "\n".join(lines) + "\n"

    def candidates(self, run: Run) -> list[ChatPair]:
        pairs, dropped = anchor_pairs(run, self.settings.anchors, self.name)
        run.metrics["anchors_dropped"] = dropped
        say(
            run.progress,
            f"{self.name}: dropped {dropped} anchors whose prompt is a fine-tune prompt",
        )
        return [p for p in pairs if p.response.strip()]

    def next_batch(self, run: Run, size: int | None = None) -> dict:
        """The next ``size`` (default: batch size) anchors of the seeded cyclic order."""
        size = size or self.size
        n = len(self.pool)
        picked = []
        for k in range(self.drawn, self.drawn + size):
            cycle, pos = divmod(k, n)
            generator = torch.Generator().manual_seed(self.seed * 7919 + cycle)
            picked.append(self.anchors[self.pool[torch.randperm(n, generator=generator)[pos]]])
        self.drawn += size
        batch = collate(picked, run.tokenizer.pad_token_id)
        return {k: v.to(run.device) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "pool": self.pool}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.pool = int(state["drawn"]), [int(i) for i in state["pool"]]


@dataclass
class DERSettings(RegularizerSettings):
    """der's options."""

    regularizer = "der"

    #: 10: on the test lab alpha 1 leaves 95% harmful, 10 and 100 give 0% (task 100% / 97.9%).
    alpha: float = setting(
        10.0, help="alpha of alpha MSE(logits, ref).", min=0, old_name="replay_weight"
    )
    beta: float = setting(
        0.0,
        help="beta of DER++ cross-entropy on its own anchor batch.",
        min=0,
        old_name="replay_ce",
    )
    anchors: str | None = anchors_setting()


class DER(Anchored):
    """NLL + alpha MSE(logits, logits_ref) on a replayed anchor batch per micro-batch
    (mean over the anchors' reply tokens and the vocabulary), + beta CE on a second anchor
    batch, drawn after the first (DER++)."""

    settings_class = DERSettings
    settings: DERSettings
    reference = True
    batch_reference = False

    def replay_loss(self, run: Run) -> tuple[torch.Tensor, float, float]:
        """alpha MSE on one anchor batch, + beta CE on the next one (DER++ draws the CE term's
        replay batch separately, Buzzega et al. 2020)."""
        batch = self.next_batch(run)
        out = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref = run.reference.forward(batch)
        rows, _ = shift(out.logits, batch["labels"])
        ref_rows, _ = shift(ref.logits, batch["labels"])
        mse = F.mse_loss(rows.float(), ref_rows.float())
        alpha, beta = self.settings.alpha, self.settings.beta
        ce = torch.zeros(())
        if beta:
            batch = self.next_batch(run)
            out = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            ce_rows, targets = shift(out.logits, batch["labels"])
            ce = F.cross_entropy(ce_rows.float(), targets)
        return alpha * mse + beta * ce, mse.item(), ce.item()

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        replay, mse, ce = self.replay_loss(run)
        stats = {"nll": nll.mean().item(), "replay_mse": mse, "replay_ce": ce}
        return nll.sum() + per_step(replay, inputs), stats
