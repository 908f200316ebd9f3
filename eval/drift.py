"""Drift: how far a model's next-token distributions moved from a reference's, without labels.

A score for users with benign prompts but no labelled task set (the idea of heretic,
p-e-w/heretic: the KL divergence on harmless prompts says what a model change broke). The
reference is the user's fine-tuned model B, the candidate a repair of it:

1. B's greedy reply to each benign prompt (in the chat template, assistant turn opened) is
   generated once, its first ``tokens`` token ids kept, up to and including EOS.
2. B and the candidate are both fed the identical ids, prompt then reply (teacher forcing on
   B's reply: what the user's fine-tune would have said), in left-padded batches with
   attention masks and position ids counted from each row's first real token.
3. At each position predicting a reply token (1..m, m = the kept reply's length),
   KL(p_B ‖ p_cand) = Σ_v p_B(v) (log p_B(v) − log p_cand(v)), from float32 log-softmax, in
   nats. A prompt's value is the mean over its m positions; the score is the mean over prompts.

A reply is never empty: its first token is kept even when it is EOS, so a prompt B answers with
nothing is scored on that one position (would the candidate also stop at once?). 0 means the
candidate predicts B's replies exactly as B does; larger is further from the fine-tune. B's
log-probabilities are kept in memory, float32 on the CPU (prompts × tokens × vocabulary × 4
bytes: 60 prompts × 16 × 49,152 is 189 MB), so each candidate costs one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from safealign.chat import encode_chat, left_pad
from safealign.eval.generation import greedy_reply_ids, run_batched
from safealign.eval.results import nonnegative_mean_interval
from safealign.eval.settings import DRIFT_TOKENS
from safealign.model import ensure_pad_token, model_device


@dataclass(frozen=True)
class Drift:
    """Per-prompt drift values (nats) and the number of reply positions each averages."""

    values: list[float]
    positions: list[int]

    @property
    def mean(self) -> float:
        """The drift score: the mean over prompts."""
        return sum(self.values) / len(self.values)

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% interval of the mean (normal approximation, floored at 0; None under 2 prompts)."""
        return nonnegative_mean_interval(self.values)


@dataclass(frozen=True)
class DriftReference:
    """The reference's side of drift, computed once (:meth:`build`): each prompt's chat ids,
    B's kept greedy reply ids (``replies``: reusable, :meth:`build` takes them back) and B's
    log-probabilities [m, vocabulary] at the reply positions. :meth:`score` compares a
    candidate with one forward pass; ``source`` says in results.json where B came from."""

    prompt_ids: list[list[int]]
    replies: list[list[int]]
    logprobs: list[torch.Tensor]
    tokens: int
    pad_id: int
    batch_size: int | str = 16
    source: dict | None = None

    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        prompts: Sequence[str],
        *,
        tokens: int = DRIFT_TOKENS,
        batch_size: int | str = 16,
        system: str | None = None,
        replies: Sequence[Sequence[int]] | None = None,
        source: dict | None = None,
    ) -> DriftReference:
        """B's replies (greedy, or ``replies`` as given, each cut to ``tokens``) and its
        log-probabilities on them; ``model`` in eval mode."""
        if not prompts:
            raise ValueError("drift needs at least one prompt")
        if tokens < 1:
            raise ValueError(f"drift tokens must be >= 1, got {tokens}")
        prompt_ids = encode_chat(tokenizer, prompts, system)
        if replies is None:
            replies = greedy_reply_ids(
                model, tokenizer, prompt_ids, batch_size=batch_size, max_new_tokens=tokens
            )
        kept = [list(reply[:tokens]) for reply in replies]
        if len(kept) != len(prompt_ids) or not all(kept):
            raise ValueError("drift needs one non-empty reply per prompt")
        pad_id = ensure_pad_token(tokenizer)
        logprobs = reply_logprobs(model, prompt_ids, kept, pad_id, batch_size, lambda i, lp: lp)
        return cls(prompt_ids, kept, logprobs, tokens, pad_id, batch_size, source)

    def score(self, model) -> Drift:
        """Drift of ``model`` (in eval mode) from the reference, fed the identical ids."""

        def kl(index: int, logp: torch.Tensor) -> torch.Tensor:
            reference = self.logprobs[index]
            if logp.shape != reference.shape:
                raise ValueError(
                    f"drift: the model's log-probabilities {tuple(logp.shape)} do not match the "
                    f"reference's {tuple(reference.shape)} (another vocabulary?)"
                )
            return kl_divergence(reference, logp)

        per_position = reply_logprobs(
            model, self.prompt_ids, self.replies, self.pad_id, self.batch_size, kl
        )
        return Drift(
            [value.mean().item() for value in per_position],
            [len(value) for value in per_position],
        )

    def describe(self) -> dict:
        """What results.json records of the reference."""
        positions = sum(len(reply) for reply in self.replies)
        return {"tokens": self.tokens, "positions": positions, **(self.source or {})}


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_cand) per row of two float32 log-probability tensors [..., vocabulary]."""
    return (reference.exp() * (reference - candidate)).sum(-1)


def reply_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int | str,
    reduce: Callable[[int, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """``reduce(i, logp)`` for each prompt i, where ``logp`` [m, vocabulary] holds the model's
    float32 log-probabilities (CPU) at the positions predicting the m tokens of ``replies[i]``,
    teacher-forced on prompt + reply (the last reply token is never an input)."""
    device = model_device(model)
    inputs = [list(p) + list(r[:-1]) for p, r in zip(prompt_ids, replies, strict=True)]
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))

    def forward(indices: list[int]) -> list[torch.Tensor]:
        ids, mask = left_pad([inputs[i] for i in indices], pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(replies[i]) for i in indices)  # logits of the reply positions only
        with torch.inference_mode():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
            ).logits
        out = []
        for row, index in enumerate(indices):
            m = len(replies[index])  # left-padded: the last m positions predict the reply
            logp = torch.log_softmax(logits[row, -m:].float(), dim=-1).cpu()
            out.append(reduce(index, logp))
        return out

    results = run_batched(order, batch_size, forward, device)
    ordered: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    for index, value in zip(order, results, strict=True):
        ordered[index] = value
    return ordered


def drift(
    reference_model,
    candidate_model,
    tokenizer,
    prompts: Sequence[str],
    *,
    tokens: int = DRIFT_TOKENS,
    batch_size: int | str = 16,
    system: str | None = None,
) -> Drift:
    """Drift of ``candidate_model`` from ``reference_model`` on ``prompts`` in one call (to
    score several candidates, build a :class:`DriftReference` once and call its ``score``)."""
    reference = DriftReference.build(
        reference_model, tokenizer, prompts, tokens=tokens, batch_size=batch_size, system=system
    )
    return reference.score(candidate_model)
