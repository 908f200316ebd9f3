"""Last-token hidden states at the direction layer, and the cosine loss on them.

The hidden state "at layer L" is the residual stream after the first L decoder blocks
(``hidden_states[L]`` in Hugging Face's numbering, before any final norm). The forward pass
stops there: a hook on block L-1 records its output and ends the pass, so the blocks above L,
the final norm and the LM head never run, and backward only reaches blocks below L.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from safealign.chat import encode_chat, left_pad
from safealign.layers import decoder_layers
from safealign.model import model_device


class _Reached(Exception):
    """Raised by the hook once the direction layer's output is recorded."""


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def layer_states(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, layer: int):
    """Last-token hidden states ``[batch, hidden]`` after ``layer`` decoder blocks.

    Inputs are left padded, so the last position is every row's last prompt token; position
    ids count real tokens only. Gradients flow when grad mode is on.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = decoder_layers(model)[layer - 1].register_forward_hook(hook)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0][:, -1, :]


def encoded_batches(tokenizer, prompts: Sequence[str], batch_size: int, device: torch.device):
    """(input_ids, attention_mask) per batch of chat-formatted prompts, left padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for batch in _batches(list(prompts), batch_size):
        yield left_pad(encode_chat(tokenizer, batch), pad, device)


@torch.no_grad()
def mean_state(model, tokenizer, prompts: Sequence[str], layer: int, batch_size: int):
    """Mean last-token hidden state at ``layer`` over ``prompts``, fp32 ``[hidden]``."""
    total, count = None, 0
    for input_ids, mask in encoded_batches(tokenizer, prompts, batch_size, model_device(model)):
        states = layer_states(model, input_ids, mask, layer).float()
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
    for input_ids, mask in encoded_batches(tokenizer, prompts, batch_size, model_device(model)):
        with torch.enable_grad():
            mean = layer_states(model, input_ids, mask, layer).float().mean(0)
            loss = -torch.nn.functional.cosine_similarity(mean, target, dim=0)
            loss.backward()
        losses.append(loss.item())
    return sum(losses) / len(losses)
