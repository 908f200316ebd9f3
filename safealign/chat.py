"""Chat encoding: a prompt in the tokenizer's chat template (assistant turn opened), as text
or token ids, and left-padded batches of token ids for generation and last-token states."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """Format one user prompt with the tokenizer's chat template, assistant turn opened."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def encode_chat(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt in the chat template, assistant turn opened.

    The template usually writes the BOS token itself; it is added only when the formatted
    text does not already start with it.
    """
    ids = []
    for prompt in prompts:
        text = chat_prompt(tokenizer, prompt, system)
        bos = tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids.append(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    return ids


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (input_ids, attention_mask), padding on the left."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return input_ids.to(device), mask.to(device)
