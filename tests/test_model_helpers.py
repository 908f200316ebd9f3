"""The core helpers find decoder layers (by structure and by name), pad, and render reports."""

import json

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from safealign.layers import (
    LayerError,
    decoder_layers,
    layer_index,
    layer_prefix,
    num_decoder_layers,
)
from safealign.model import ensure_pad_token, resolve_dtype
from safealign.paths import has_tokenizer
from safealign.report import markdown_table, write_json


def test_decoder_layers_found_by_structure_for_llama_and_neox():
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=5,
            num_attention_heads=2,
        )
    )
    assert decoder_layers(llama) is llama.model.layers
    assert decoder_layers(neox) is neox.gpt_neox.layers
    for model, prefix in ((llama, "model.layers."), (neox, "gpt_neox.layers.")):
        names = list(model.state_dict())
        n = num_decoder_layers(model.config.to_dict(), names)
        assert n == len(decoder_layers(model))
        assert layer_prefix(names, n) == prefix
        assert layer_index(prefix + "2.mlp.up_proj.weight") == 2


def test_layer_count_reads_text_config_then_names():
    assert num_decoder_layers({"text_config": {"num_hidden_layers": 7}}) == 7
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.3.a.weight"]
    assert num_decoder_layers({}, names) == 4
    assert layer_index("model.embed_tokens.weight") is None
    with pytest.raises(LayerError, match="no num_hidden_layers"):
        num_decoder_layers({}, ["lm_head.weight"])
    with pytest.raises(LayerError, match="numbered 0..3"):
        layer_prefix(names, 4)


def test_one_pad_token_rule_and_tokenizer_check(tmp_path):
    class Tok:
        pad_token, eos_token = None, "</s>"

        @property
        def pad_token_id(self):
            return {"</s>": 2, "<pad>": 0}.get(self.pad_token)

    tok = Tok()
    assert ensure_pad_token(tok) == 2 and tok.pad_token == "</s>"
    tok.pad_token = "<pad>"
    assert ensure_pad_token(tok) == 0
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        ensure_pad_token(tok)
    assert not has_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert has_tokenizer(tmp_path)


def test_resolve_dtype_names_and_error():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(None) == "auto"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_markdown_table_and_json(tmp_path):
    table = markdown_table([{"name": "a", "harmful_rate": 0.5, "utility": None}])
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "name"
    assert "0.500" in lines[2] and "-" in lines[2]
    path = write_json(tmp_path / "x" / "r.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
