"""The direction layer's states from a batch whose shared chat prefix runs once: the same
states and gradients as one pass over the whole prompts."""

from __future__ import annotations

import pytest
import torch
from eval_support import WORDS, tiny_model, word_tokenizer

from safealign.chat import encode_chat, left_pad
from safealign.layers import decoder_layers
from safealign.recover.direction import (
    MIN_SHARED_PREFIX,
    EncodedBatch,
    encoded_batches,
    layer_states,
    shared_prefix_length,
)

#: A template that opens every prompt with a fixed system message, as SmolLM2's and Llama 3's do.
SYSTEM_TEMPLATE = (
    "{{ bos_token }}<|system|> you can help with that and it is safe to answer the first "
    "question here . {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = [
    "kill python process",
    "how to bake a cake ?",
    "write poem",
    "explain what 1 + 2 = ? and what 3 + 4 = ? in it",
    "break into house",
]


def test_shared_prefix_length_leaves_every_last_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8, 9], [7, 8, 9]]) == 2
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


def _states_and_grads(model, batch: EncodedBatch, layer: int):
    model.zero_grad(set_to_none=True)
    states = layer_states(model, batch, layer).float()
    target = torch.linspace(-1, 1, states.shape[1])
    (-torch.nn.functional.cosine_similarity(states.mean(0), target, dim=0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return states.detach(), grads


@pytest.mark.parametrize("layer", [1, 3])
def test_shared_prefix_gives_the_states_and_gradients_of_one_pass(layer):
    tokenizer = word_tokenizer(WORDS, roles=("user", "assistant", "system"))
    tokenizer.chat_template = SYSTEM_TEMPLATE
    model = tiny_model(tokenizer, layers=3).float()
    model.requires_grad_(False)
    for block in decoder_layers(model)[:layer]:
        block.requires_grad_(True)
    [split] = encoded_batches(tokenizer, PROMPTS, len(PROMPTS), torch.device("cpu"))
    assert split.prefix is not None and split.prefix.shape[1] >= MIN_SHARED_PREFIX
    ids = encode_chat(tokenizer, PROMPTS)
    whole = EncodedBatch(None, *left_pad(ids, tokenizer.pad_token_id, torch.device("cpu")))
    assert whole.input_ids.shape[1] == split.prefix.shape[1] + split.input_ids.shape[1]

    states, grads = _states_and_grads(model, whole, layer)
    split_states, split_grads = _states_and_grads(model, split, layer)

    torch.testing.assert_close(split_states, states, rtol=1e-4, atol=1e-5)
    assert split_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_short_shared_prefix_runs_in_one_pass():
    tokenizer = word_tokenizer(WORDS, roles=("user", "assistant", "system"))
    [batch] = encoded_batches(tokenizer, PROMPTS, len(PROMPTS), torch.device("cpu"))
    assert batch.prefix is None
    assert batch.input_ids.shape[1] == max(len(i) for i in encode_chat(tokenizer, PROMPTS))


def test_one_prompt_runs_in_one_pass():
    tokenizer = word_tokenizer(WORDS, roles=("user", "assistant", "system"))
    tokenizer.chat_template = SYSTEM_TEMPLATE
    batches = list(encoded_batches(tokenizer, PROMPTS[:2], 1, torch.device("cpu")))
    assert [b.prefix for b in batches] == [None, None]
