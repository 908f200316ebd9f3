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


def encode_pairs(tokenizer, pairs: Sequence) -> list[tuple[list[int], int]]:
    """Training examples ``(ids, start)``: the prompt in the chat template (assistant turn
    opened, a pair's ``system`` if it has one), then the reply and EOS, trained from ``start``.
    ``pairs`` have ``prompt`` and ``response`` (a :class:`~safealign.data.ChatPair`)."""
    examples = []
    for pair in pairs:
        prompt = encode_chat(tokenizer, [pair.prompt], getattr(pair, "system", None))[0]
        reply = tokenizer(pair.response, add_special_tokens=False)["input_ids"]
        examples.append((prompt + reply + [tokenizer.eos_token_id], len(prompt)))
    return examples


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


#: The label of a token the loss skips (prompt and padding), as transformers uses it.
IGNORE = -100


def collate(batch: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` of ``(ids, reply start)``
    examples: labels are the ids from the reply on, IGNORE on the prompt and padding."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, start) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
