"""interleave (seed 004's Interleaving++): safety anchors mixed into the task batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safealign.chat import collate
from safealign.data import ChatPair
from safealign.retrain.divergence import shift, token_nll
from safealign.retrain.regularizers.base import RegularizerSettings, Run, nll_rows
from safealign.retrain.regularizers.replay import Anchored, anchors_setting
from safealign.settings import setting

REFUSAL_WORDS = ("sorry", "apologize", "cannot")
EPS = 1e-6


def looks_like_refusal(reply: str) -> bool:
    """The paper's filter: a refusal word among the first 10 words."""
    words = reply.lower().replace("'", " ").split()[:10]
    return any(word.strip(".,!?") in REFUSAL_WORDS for word in words)


def _inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def mean_nll(out, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each example's trained tokens (``[B]``)."""
    rows, targets = shift(out.logits, labels)
    nll = token_nll(rows, targets)
    index = torch.nonzero(labels[:, 1:] != -100)[:, 0]
    total = torch.zeros(labels.shape[0], device=nll.device).index_add_(0, index, nll)
    return total / torch.bincount(index, minlength=labels.shape[0]).clamp(min=1)


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
    filter_refusals: bool = setting(True, help="Drop anchors whose reply looks like a refusal.")
    anchors: str | None = anchors_setting()


class Interleave(Anchored):
    """Plain NLL on task batches with anchors mixed in: ``share`` of the training examples
    are anchors (each micro-batch gets round(batch * share / (1 - share)), at least one).
    At each epoch's start the anchors kept are those the model has drifted furthest from, by
    s = (L_model - L_ref) / (L_ref + eps), L the mean NLL of the anchor's reply; refusal-looking
    replies are dropped first unless ``filter_refusals`` is false."""

    settings_class = InterleaveSettings
    settings: InterleaveSettings
    reference = True
    batch_reference = False

    def __init__(self, settings: InterleaveSettings | None = None):
        super().__init__(settings)
        self.epoch = -1

    def candidates(self, run: Run) -> list[ChatPair]:
        pairs = super().candidates(run)
        if self.settings.filter_refusals:
            pairs = [p for p in pairs if not looks_like_refusal(p.response)]
        if not pairs:
            raise ValueError(
                "interleave: every anchor reply looks like a refusal; give interleave:anchors="
                "with safe non-refusal replies, or interleave:filter_refusals=false"
            )
        return pairs

    @torch.no_grad()
    def gaps(self, run: Run) -> torch.Tensor:
        """s per anchor: the relative NLL gap between the current model and the reference."""
        size = run.settings.grad_batch_size
        parts = []
        for start in range(0, len(self.anchors), size):
            batch = collate(self.anchors[start : start + size], run.tokenizer.pad_token_id)
            batch = {k: v.to(run.device) for k, v in batch.items()}
            model = mean_nll(run.unwrapped(**_inputs(batch)), batch["labels"])
            ref = mean_nll(run.reference.forward(batch), batch["labels"])
            parts.append((model - ref) / (ref + EPS))
        return torch.cat(parts)

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        share = self.settings.share
        count = min(len(self.anchors), math.ceil(share / (1 - share) * len(run.examples)))
        order = torch.argsort(self.gaps(run).cpu(), descending=True, stable=True)
        self.pool = sorted(order[:count].tolist())

    def loss(self, run: Run, inputs: dict, out, ref):
        share = self.settings.share
        per_batch = max(1, round(inputs["input_ids"].shape[0] * share / (1 - share)))
        batch = self.next_batch(run, per_batch)
        anchor_out = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        nll, anchor = nll_rows(out, inputs), nll_rows(anchor_out, batch)
        stats = {"nll": nll.mean().item(), "anchor_nll": anchor.mean().item()}
        return nll.sum() + anchor.sum(), stats

    def state_dict(self) -> dict:
        return super().state_dict() | {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch = int(state["epoch"])
