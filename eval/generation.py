"""Greedy, batched, left-padded generation through the chat template.

Prompts are formatted with the tokenizer's chat template (assistant turn opened), sorted by
token length so each batch pads little, run through ``model.generate`` with greedy decoding
and the KV cache under ``torch.inference_mode``, and returned in the caller's order.

With ``decided`` (a judge's :meth:`~safealign.eval.judges.Judge.decided`), a row stops once its
reply so far decides the judge's verdict, and a batch once every row has stopped or ended: the
row's text then is a prefix of the one full generation would give (the rest are the pad token,
which decoding skips). That text is the decoded reply so far, trailing U+FFFD (an incomplete last
character) removed, stripped as replies are: a prefix of the full reply's text as long as
decoding a token prefix gives a text prefix but for its last, incomplete character (byte-level
BPE, SentencePiece with byte fallback, word-level tokenizers). Decoding that removes spaces before
punctuation (``clean_up_tokenization_spaces``) can rewrite text already decoded, so such a
tokenizer never stops early.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from safealign.chat import encode_chat, left_pad
from safealign.model import ensure_pad_token, model_device

AUTO_START_CUDA = 128
AUTO_START_CPU = 16
#: ``decided(prompt, reply so far) -> bool``: the reply's verdict can no longer change.
Decided = Callable[[str, str], bool]


def is_oom(error: BaseException) -> bool:
    """True for an accelerator out-of-memory error."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_batched(
    items: Sequence, batch_size: int | str, fn: Callable[[list], list], device: torch.device
) -> list:
    """Apply ``fn`` to consecutive batches of ``items``; ``"auto"`` halves the size on OOM."""
    if batch_size == "auto":
        size = AUTO_START_CUDA if device.type == "cuda" else AUTO_START_CPU
        auto = True
    else:
        size, auto = int(batch_size), False
        if size < 1:
            raise ValueError(f"batch_size must be >= 1 or 'auto', got {batch_size!r}")
    out: list = []
    start = 0
    while start < len(items):
        batch = list(items[start : start + size])
        try:
            out.extend(fn(batch))
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not (auto and is_oom(error) and size > 1):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size //= 2
            continue
        start += len(batch)
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int | str = 16,
    max_new_tokens: int = 48,
    system: str | None = None,
    decided: Decided | None = None,
) -> list[str]:
    """Greedy responses to ``prompts`` (in order), each formatted with the chat template.

    Responses are the decoded new tokens with special tokens removed and surrounding
    whitespace stripped. With ``decided``, a response stops once ``decided(prompt, response so
    far)`` (the module's docstring says what it is then).
    """
    encoded = encode_chat(tokenizer, prompts, system)
    stop = None if decided is None else (lambda i, text: decided(prompts[i], text))
    rows = _greedy_rows(model, tokenizer, encoded, batch_size, max_new_tokens, stop)
    return _decode(tokenizer, rows)


def generate_from_ids(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    *,
    batch_size: int | str = 16,
    max_new_tokens: int = 48,
) -> list[str]:
    """Greedy continuations of token-id sequences, in left-padded batches, in input order.

    Batches are formed from sequences sorted by length (longest first, so an ``"auto"``
    batch size meets its largest batch early).
    """
    return _decode(tokenizer, _greedy_rows(model, tokenizer, encoded, batch_size, max_new_tokens))


def _decode(tokenizer, rows: list[list[int]]) -> list[str]:
    """Replies' text: special tokens removed, surrounding whitespace stripped."""
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def rewrites_decoded_text(tokenizer) -> bool:
    """Whether decoding removes the space before punctuation ("a . b" read back as "a. b"), a
    rule that can change text already decoded when the next token comes."""
    ids = tokenizer.encode("a . b", add_special_tokens=False)
    return " ." not in tokenizer.decode(ids, skip_special_tokens=True)


class StopWhenDecided(StoppingCriteria):
    """Stops each row of a batch once ``decided(row, its reply so far)``; ``start`` is where the
    replies begin in ``input_ids``. A row once decided stays so (it is not decoded again)."""

    def __init__(self, tokenizer, rows: list[int], start: int, decided: Callable[[int, str], bool]):
        self.tokenizer, self.rows, self.start, self.decided = tokenizer, rows, start, decided
        self.done = [False] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        open_rows = [i for i, done in enumerate(self.done) if not done]
        replies = input_ids[open_rows, self.start :].tolist()
        texts = self.tokenizer.batch_decode(replies, skip_special_tokens=True)
        for i, text in zip(open_rows, texts, strict=True):
            self.done[i] = self.decided(self.rows[i], text.rstrip("\ufffd").strip())
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def greedy_reply_ids(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    *,
    batch_size: int | str = 16,
    max_new_tokens: int = 48,
) -> list[list[int]]:
    """The greedy reply token ids to each token-id sequence, as :func:`generate_from_ids`
    generates them, up to and including the first EOS (never empty: the first token is there
    even when it is EOS)."""
    eos = _eos_ids(model, tokenizer)
    replies = []
    for row in _greedy_rows(model, tokenizer, encoded, batch_size, max_new_tokens):
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        replies.append(row[:end])
    return replies


def _eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a reply: the generation config's, else the tokenizer's EOS."""
    eos_id = model.generation_config.eos_token_id
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    return set(eos_id) if isinstance(eos_id, list | tuple) else {eos_id}


def _greedy_rows(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    batch_size: int | str,
    max_new_tokens: int,
    decided: Callable[[int, str], bool] | None = None,
) -> list[list[int]]:
    """The new token ids generated for each sequence (padded after EOS), in input order; with
    ``decided`` (of a sequence's index and its reply so far), each row stops once decided."""
    if not encoded:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = ensure_pad_token(tokenizer)
    eos_id = model.generation_config.eos_token_id
    if eos_id is None:
        eos_id = tokenizer.eos_token_id
    if decided is not None and rewrites_decoded_text(tokenizer):
        decided = None

    def generate_batch(indices: list[int]) -> list[list[int]]:
        input_ids, mask = left_pad([encoded[i] for i in indices], pad_id, device)
        stop = None
        if decided is not None:
            criterion = StopWhenDecided(tokenizer, indices, input_ids.shape[1], decided)
            stop = StoppingCriteriaList([criterion])
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                use_cache=True,
                temperature=None,
                top_p=None,
                top_k=None,
                stopping_criteria=stop,
            )
        return output[:, input_ids.shape[1] :].tolist()

    rows = run_batched(order, batch_size, generate_batch, device)
    result: list[list[int]] = [[] for _ in encoded]
    for index, row in zip(order, rows, strict=True):
        result[index] = row
    return result
