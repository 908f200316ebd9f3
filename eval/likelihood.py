"""Log-likelihoods from forward passes (no generation): next-token and continuation scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safealign.chat import encode_chat, left_pad
from safealign.eval.generation import run_batched
from safealign.model import ensure_pad_token, model_device


def next_token_logprobs(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int | str = 16, system=None
) -> torch.Tensor:
    """Log-probabilities [n, vocab] of the first response token for each chat prompt."""
    device = model_device(model)
    encoded = encode_chat(tokenizer, prompts, system)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))

    def forward(indices: list[int]) -> list[torch.Tensor]:
        ids, mask = left_pad([encoded[i] for i in indices], ensure_pad_token(tokenizer), device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return list(torch.log_softmax(logits[:, -1].float(), dim=-1).cpu())

    rows = run_batched(order, batch_size, forward, device)
    out = torch.empty((len(prompts), rows[0].shape[-1]))
    for index, row in zip(order, rows, strict=True):
        out[index] = row
    return out


def split_continuation(tokenizer, context_ids: list[int], context: str, continuation: str):
    """Token ids of ``continuation`` as it follows ``context`` (tokenized together)."""
    bos = tokenizer.bos_token
    add_special = not (bos and context.startswith(bos))
    whole = tokenizer(context + continuation, add_special_tokens=add_special)["input_ids"]
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        return whole[len(context_ids) :]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def continuation_logprobs(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    batch_size: int | str = 16,
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each continuation given its context ids.

    Sequences are right-padded; the context may be empty only if the continuation has at
    least two tokens (the first token then has no prediction and is skipped).
    """
    device = model_device(model)
    for context, continuation in pairs:
        if len(context) + len(continuation) < 2 or not continuation:
            raise ValueError("a continuation needs a token with something before it to predict it")
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))

    def forward(indices: list[int]) -> list[tuple[float, int]]:
        seqs = [pairs[i][0] + pairs[i][1] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        results = []
        for row, i in enumerate(indices):
            context, continuation = pairs[i]
            start = max(len(context), 1)
            targets = torch.tensor(seqs[row][start:])
            picked = logp[row, start - 1 : len(seqs[row]) - 1].gather(-1, targets[:, None])
            results.append((picked.sum().item(), len(targets)))
        return results

    scored = run_batched(order, batch_size, forward, device)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for index, value in zip(order, scored, strict=True):
        out[index] = value
    return out
