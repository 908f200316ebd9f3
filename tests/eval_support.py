"""Tiny offline models and files for the safealign.eval tests (no downloads, CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "I ' m sorry cannot can t help with that Sure here is how to a the of and in it you "
    "kill python process bake cake break into house write poem explain what 1 2 3 4 5 6 7 8 "
    "9 0 + = ? . , ! Step first then make tool safe unsafe yes no answer ok"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def word_tokenizer(
    words: list[str],
    *,
    roles: tuple[str, ...] = ("user", "assistant"),
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids ``<pad> <s> </s> <unk>``, one ``<|role|>`` special token per
    role, then ``words`` (repeats dropped). Splits at white space and punctuation."""
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


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small fixed vocabulary, with a chat template."""
    return word_tokenizer(WORDS, roles=("user", "assistant", "system"), chat_template=chat_template)


def tiny_config(tokenizer, *, layers: int = 2, hidden: int = 32, **extra) -> LlamaConfig:
    """A tiny Llama config over ``tokenizer``'s vocabulary and special tokens; ``extra``
    overrides any setting."""
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return LlamaConfig(**(settings | extra))


def tiny_model(tokenizer, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random tiny Llama over ``tokenizer``'s vocabulary, in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, layers=layers))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny(folder: Path, seed: int = 0):
    """Write a tiny model and tokenizer to ``folder``; return (model, tokenizer)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def scripted_model(tokenizer, next_token: dict[str, str], default: str) -> LlamaForCausalLM:
    """A tiny Llama whose greedy next token depends only on the last token.

    Attention and MLP outputs are zeroed, so the final hidden state is the (one-hot)
    embedding of the last token; ``lm_head`` maps it to ``next_token[last]`` (else
    ``default``) with a clear margin.
    """
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = tiny_config(
        tokenizer,
        layers=1,
        hidden=vocab + (-vocab) % 8,
        intermediate_size=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for token_id in range(vocab):
            model.model.embed_tokens.weight[token_id, token_id] = 1.0
            token = tokenizer.convert_ids_to_tokens(token_id)
            target = tokenizer.convert_tokens_to_ids(next_token.get(token, default))
            model.lm_head.weight[target, token_id] = 1.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_scripted(folder: Path, next_token: dict[str, str], default: str) -> Path:
    """Write a scripted model with the tiny tokenizer to ``folder``."""
    tokenizer = tiny_tokenizer()
    scripted_model(tokenizer, next_token, default).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_classifier(folder: Path, id2label: dict[int, str], seed: int = 0) -> Path:
    """Write a tiny random sequence classifier with ``id2label`` to ``folder``."""
    from transformers import LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(
        tokenizer,
        layers=1,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
