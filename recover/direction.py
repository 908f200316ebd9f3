"""Last-token hidden states at the direction layer, and the cosine loss on them.

The hidden state "at layer L" is the residual stream after the first L decoder blocks
(``hidden_states[L]`` in Hugging Face's numbering, before any final norm). The forward pass
stops there: a hook on block L-1 records its output and ends the pass, so the blocks above L,
the final norm and the LM head never run, and backward only reaches blocks below L.

Chat templates open every prompt with the same tokens (a default system prompt: 24 of a
SmolLM2 lab prompt's ~51 tokens, and Llama 3's and Qwen2's have one too). A batch's shared
prefix, when it is at least :data:`MIN_SHARED_PREFIX` tokens, runs once, and the rest of each
prompt attends to its keys and values, repeated over the batch: the same states (up to float
rounding) and the same gradients (backward sums the repeats). On the real-model lab a gradient
pass runs 41% fewer tokens and takes 0.68x the time (``benchmarks/bench_direction.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from safealign.chat import encode_chat, left_pad
from safealign.layers import decoder_layers
from safealign.model import model_device


class _Reached(Exception):
    """Raised by the hook once the direction layer's output is recorded."""


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: The shortest shared prefix run on its own: below it one pass over the batch costs less.
MIN_SHARED_PREFIX = 8


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of chat-formatted prompts: the token ids they all start with (None when fewer
    than :data:`MIN_SHARED_PREFIX`, or for one prompt), and the rest of each, left padded,
    with its mask."""

    prefix: torch.Tensor | None  # [1, prefix length]
    input_ids: torch.Tensor  # [batch, rest]
    mask: torch.Tensor  # [batch, rest]


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least its last token."""
    longest = min(len(s) for s in sequences) - 1
    length = 0
    while length < longest and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def encoded_batches(
    tokenizer, prompts: Sequence[str], batch_size: int, device: torch.device
) -> Iterator[EncodedBatch]:
    """Each batch of chat-formatted ``prompts``, its shared prefix split off when long enough."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for batch in _batches(list(prompts), batch_size):
        ids = encode_chat(tokenizer, batch)
        shared = shared_prefix_length(ids)
        if len(ids) < 2 or shared < MIN_SHARED_PREFIX:  # one prompt shares nothing
            yield EncodedBatch(None, *left_pad(ids, pad, device))
            continue
        prefix = torch.tensor([ids[0][:shared]], dtype=torch.long, device=device)
        yield EncodedBatch(prefix, *left_pad([s[shared:] for s in ids], pad, device))


def layer_states(model: nn.Module, batch: EncodedBatch, layer: int) -> torch.Tensor:
    """Last-token hidden states ``[batch, hidden]`` after ``layer`` decoder blocks.

    The rest of each prompt is left padded, so the last position is every row's last prompt
    token; position ids count real tokens only (after the prefix's). Gradients flow when grad
    mode is on.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = decoder_layers(model)[layer - 1].register_forward_hook(hook)
    position_ids = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    try:
        if batch.prefix is None:
            _forward(
                model,
                input_ids=batch.input_ids,
                attention_mask=batch.mask,
                use_cache=False,
                position_ids=position_ids,
            )
        else:
            name, cache = _cache_argument(model), DynamicCache(config=model.config)
            _forward(model, input_ids=batch.prefix, use_cache=True, **{name: cache})
            cache.batch_repeat_interleave(batch.input_ids.shape[0])
            length = batch.prefix.shape[1]
            seen = torch.ones(
                batch.mask.shape[0], length, dtype=batch.mask.dtype, device=batch.mask.device
            )
            _forward(
                model,
                input_ids=batch.input_ids,
                attention_mask=torch.cat([seen, batch.mask], dim=1),
                position_ids=position_ids + length,
                use_cache=True,
                **{name: cache},
            )
    finally:
        handle.remove()
    return captured[-1][:, -1, :]


def _cache_argument(model: nn.Module) -> str:
    """The name ``forward`` takes a cache by: ``cache`` in newer transformers releases,
    ``past_key_values`` before (deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model: nn.Module, **inputs) -> None:
    """Run ``model`` until the hook on the direction layer ends the pass."""
    try:
        model(**inputs)
    except _Reached:
        pass


@torch.no_grad()
def mean_state(model, tokenizer, prompts: Sequence[str], layer: int, batch_size: int):
    """Mean last-token hidden state at ``layer`` over ``prompts``, fp32 ``[hidden]``."""
    total, count = None, 0
    for batch in encoded_batches(tokenizer, prompts, batch_size, model_device(model)):
        states = layer_states(model, batch, layer).float()
        total = states.sum(0) if total is None else total + states.sum(0)
        count += states.shape[0]
    return total / count


def cosine_backward(
    model, tokenizer, prompts: Sequence[str], layer: int, target: torch.Tensor, batch_size: int
) -> float:
    """For each batch: loss = -cos(mean last-token state, target); backward (grads add up).

    Returns the mean loss over batches.
    """
    losses = []
    target = target.to(model_device(model))
    for batch in encoded_batches(tokenizer, prompts, batch_size, model_device(model)):
        with torch.enable_grad():
            mean = layer_states(model, batch, layer).float().mean(0)
            loss = -torch.nn.functional.cosine_similarity(mean, target, dim=0)
            loss.backward()
        losses.append(loss.item())
    return sum(losses) / len(losses)
