"""The lab's tokenizer: a small byte-level BPE trained on the lab's own text, chat template.

Also :func:`word_tokenizer`, a word-level tokenizer over a given word list for tiny synthetic
models (tests and benchmarks), that needs no training.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

USER, ASSISTANT, SYSTEM, END, PAD = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, END, USER, ASSISTANT, SYSTEM)

#: One turn per message: ``<|role|>content<|end|>``; the generation prompt opens the assistant
#: turn. ``<|end|>`` is the EOS token, so greedy generation stops at the turn's end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE on ``texts``; return a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        chat_template=CHAT_TEMPLATE,
        add_prefix_space=True,
        padding_side="left",
        model_max_length=256,
    )


#: The chat template of :func:`word_tokenizer`: ``<s><|role|> content ... <|assistant|>``.
WORD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def word_tokenizer(
    words: Iterable[str],
    *,
    roles: Sequence[str] = ("user", "assistant"),
    chat_template: str | None = WORD_CHAT_TEMPLATE,
):
    """A word-level tokenizer over ``words``; return a transformers fast tokenizer.

    Ids: ``<pad> <s> </s> <unk>``, one ``<|role|>`` special token per role, then ``words`` in
    order (repeats dropped). Text splits at white space and punctuation; other words are
    ``<unk>``.
    """
    from transformers import PreTrainedTokenizerFast

    role_tokens = [f"<|{role}|>" for role in roles]
    tokens = ["<pad>", "<s>", "</s>", "<unk>", *role_tokens, *dict.fromkeys(words)]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=role_tokens,
    )
    tokenizer.chat_template = chat_template
    return tokenizer
