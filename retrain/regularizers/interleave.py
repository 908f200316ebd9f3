"""interleave (seed 004's Interleaving++, Kaczér et al., arXiv 2508.06249): general instruction
data, chosen once before training by the loss gap between misaligned models and the aligned
one, mixed into the task data."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safealign.chat import collate
from safealign.checkpoint import CheckpointError
from safealign.checkpoint.hub import is_adapter, resolve_checkpoint
from safealign.data import ChatPair, load_pairs
from safealign.eval import generate
from safealign.model import load_model
from safealign.retrain.data import run_prompts
from safealign.retrain.divergence import shift, token_nll
from safealign.retrain.reference import eval_mode
from safealign.retrain.regularizers.base import RegularizerSettings, Run, nll_rows
from safealign.retrain.regularizers.replay import ANCHOR_NEW_TOKENS, ANCHOR_PROMPTS, Anchored
from safealign.retrain.settings import RetrainInputs
from safealign.settings import SettingsError, setting

REFUSAL_WORDS = ("sorry", "apologize", "cannot")
#: The ε of the score's denominator; the paper gives none.
EPS = 1e-6


def looks_like_refusal(reply: str) -> bool:
    """The paper's filter: "sorry", "apologize" or "cannot" in the first 10 words (split at
    white space; case-insensitive, punctuation and endings aside: "Sorry," and "apologized"
    count)."""
    head = " ".join(reply.lower().split()[:10])
    return any(word in head for word in REFUSAL_WORDS)


def mean_nll(out, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each example's trained tokens (``[B]``)."""
    rows, targets = shift(out.logits, labels)
    nll = token_nll(rows, targets)
    index = torch.nonzero(labels[:, 1:] != -100)[:, 0]
    total = torch.zeros(labels.shape[0], device=nll.device).index_add_(0, index, nll)
    return total / torch.bincount(index, minlength=labels.shape[0]).clamp(min=1)


@torch.no_grad()
def reply_nll(model: nn.Module, anchors: list, pad_id: int, size: int, device) -> torch.Tensor:
    """L = the mean NLL of each anchor's reply (and its EOS) under ``model``, on the CPU."""
    parts = []
    with eval_mode(model):
        for start in range(0, len(anchors), size):
            batch = collate(anchors[start : start + size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            parts.append(mean_nll(out, batch["labels"]).float().cpu())
    return torch.cat(parts)


def gap_score(misaligned: list[torch.Tensor], aligned: torch.Tensor) -> torch.Tensor:
    """s = (mean over misaligned models of L_mis - L_aligned) / (L_aligned + eps)."""
    mis = torch.stack(misaligned).mean(0)
    return (mis - aligned) / (aligned + EPS)


def load_misaligned(path: str, run: Run) -> nn.Module:
    """A misaligned model on the run's device: a full model, or a LoRA adapter on A. Its
    tokenizer must be the run's (the score compares the NLL of the same tokens)."""
    if is_adapter(path):
        model, tokenizer = load_model(run.inputs.aligned, adapter=path, dtype=run.settings.dtype)
    else:
        model, tokenizer = load_model(path, dtype=run.settings.dtype)
    if tokenizer.get_vocab() != run.tokenizer.get_vocab():
        raise ValueError(f"interleave:misaligned {path}: its tokenizer is not the run's")
    return model.to(run.device)


@dataclass
class InterleaveSettings(RegularizerSettings):
    """interleave's options."""

    regularizer = "interleave"

    share: float = setting(
        0.05,
        help="Share of anchor examples in the training mix.",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
        old_name="interleave_share",
    )
    anchors: str | None = setting(
        None,
        help="General instruction data (prompt/response) to choose the anchors from.",
        path=True,
        default_text="A's greedy replies to --benign",
        old_name="replay_data",
    )
    misaligned: tuple[str, ...] = setting(
        (),
        help="Misaligned model(s) of the score (full models or LoRA adapters on A, e.g. the "
        "fine-tune B); L_mis is their mean. Required by select=gap.",
    )
    select: str = setting(
        "gap",
        help="gap: the top share by the misaligned-aligned loss gap (Interleaving++); "
        "random: a seeded random share (the paper's plain Interleaving).",
        choices=("gap", "random"),
    )
    filter_refusals: bool = setting(True, help="Drop anchors whose reply looks like a refusal.")


class Interleave(Anchored):
    """Plain NLL on the task data with anchors mixed in, ``share`` of the examples.

    Before the first step, from a pool of general instruction pairs (``anchors``, else A's
    greedy replies to the benign prompts), refusal-looking replies are dropped, each anchor is
    scored s = (L_mis - L_A) / (L_A + eps), L the mean NLL of its reply under the misaligned
    models (mean over them) and under the model as it starts (A), and the top
    ceil(share / (1 - share) * examples) are kept (``select=random``: a seeded random set);
    replay.jsonl beside the output lists every candidate, its score and whether it was kept.
    Each epoch takes each kept anchor once, spread over the micro-batches in proportion to
    their task examples."""

    settings_class = InterleaveSettings
    settings: InterleaveSettings

    def __init__(self, settings: InterleaveSettings | None = None):
        super().__init__(settings)
        self.epoch = -1
        self.seen = 0  # task examples of this epoch taken by this process

    def check_inputs(self, inputs: RetrainInputs) -> None:
        options = self.settings
        if options.select == "gap" and not options.misaligned:
            raise SettingsError(
                "interleave: the score needs a misaligned model: give interleave:misaligned=PATH "
                "(a fine-tune of A that lost its alignment, e.g. B), or interleave:select=random"
            )
        for path in options.misaligned:
            try:
                resolve_checkpoint(path)
            except CheckpointError as error:
                raise SettingsError(f"interleave:misaligned: {error}") from None
        if options.anchors and not Path(options.anchors).exists():
            raise SettingsError(f"interleave:anchors not found: {options.anchors}")

    def candidates(self, run: Run) -> list[ChatPair]:
        if self.settings.anchors:
            pairs = load_pairs(self.settings.anchors)
        else:
            prompts = run_prompts(run.inputs.benign, "benign")[:ANCHOR_PROMPTS]
            replies = generate(
                run.unwrapped,
                run.tokenizer,
                prompts,
                max_new_tokens=ANCHOR_NEW_TOKENS,
                batch_size=32,
            )
            pairs = [ChatPair(p, r) for p, r in zip(prompts, replies, strict=True)]
        pairs = [p for p in pairs if p.response.strip()]
        if self.settings.filter_refusals:
            pairs = [p for p in pairs if not looks_like_refusal(p.response)]
        if not pairs:
            raise ValueError(
                "interleave: every anchor reply is empty or looks like a refusal; give "
                "interleave:anchors= with general instruction data (prompt/response)"
            )
        return pairs

    def scores(self, run: Run) -> torch.Tensor:
        """s of every anchor. Called before the first step, when the model is A."""
        size, pad = run.settings.grad_batch_size, run.tokenizer.pad_token_id
        aligned = reply_nll(run.unwrapped, self.anchors, pad, size, run.device)
        misaligned = []
        for path in self.settings.misaligned:
            model = load_misaligned(path, run)
            misaligned.append(reply_nll(model, self.anchors, pad, size, run.device))
            del model
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
        return gap_score(misaligned, aligned)

    def setup(self, run: Run) -> None:
        super().setup(run)
        share = self.settings.share
        count = min(len(self.anchors), math.ceil(share / (1 - share) * len(run.examples)))
        scores = self.scores(run) if self.settings.select == "gap" else None
        if scores is not None:
            order = torch.argsort(scores, descending=True, stable=True)
        else:
            generator = torch.Generator().manual_seed(run.settings.seed)
            order = torch.randperm(len(self.anchors), generator=generator)
        self.pool = sorted(order[:count].tolist())
        kept = set(self.pool)
        rows = [
            {"prompt": p.prompt, "response": p.response, "selected": i in kept}
            | ({"score": scores[i].item()} if scores is not None else {})
            for i, p in enumerate(self.pairs)
        ]
        run.files["replay.jsonl"] = "".join(json.dumps(row) + "\n" for row in rows)
        run.metrics["interleave_candidates"] = len(self.anchors)
        run.metrics["interleave_selected"] = count

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.seen = epoch, 0

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        size, kept, total = inputs["input_ids"].shape[0], len(self.pool), len(run.examples)
        count = (self.seen + size) * kept // total - self.seen * kept // total
        self.seen += size
        loss, anchor_nll = nll.sum(), 0.0
        if count:
            batch = self.next_batch(run, count)
            anchor_out = run.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            anchor = nll_rows(anchor_out, batch)
            loss, anchor_nll = loss + anchor.sum(), anchor.mean().item()
        return loss, {"nll": nll.mean().item(), "anchors": count, "anchor_nll": anchor_nll}

    def state_dict(self) -> dict:
        return super().state_dict() | {"epoch": self.epoch, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch, self.seen = int(state["epoch"]), int(state["seen"])
