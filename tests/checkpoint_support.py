"""Tiny checkpoints for the safealign.checkpoint tests: random Llama/GPT-2 models saved with
save_pretrained, PEFT adapters on them, and PEFT's own merge as the reference (CPU, offline).
The fixtures ``base`` and ``adapter`` serve the test modules that import them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from safealign.checkpoint import Checkpoint, CheckpointWriter, ModelCard

CARD = ModelCard(
    title="test output",
    method="copy",
    summary="Copied tensor by tensor.",
    settings={"alpha": 0.5},
    inputs={"model": "tiny"},
    results={"merged": {"harmful_rate": 0.1, "utility": 0.9}},
)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings))


def save_model(model, folder: Path, max_shard_size="20KB") -> Path:
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tools.jinja").write_text("{{ tools }}")
    return folder


def load_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def save_adapter(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    settings.update(lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base), LoraConfig(**settings))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    param.normal_(0, 0.5)
        model.save_pretrained(out)
    return out


def merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload()
    return model.state_dict()


def copy_all(source: Checkpoint, out: Path, **kwargs) -> Path:
    with CheckpointWriter(out, source=source, **kwargs) as writer:
        for name in source.names():
            writer.add(name, source.get(name))
        return writer.finish(CARD)


@pytest.fixture(scope="module", name="base")
def base_fixture(tmp_path_factory) -> Path:
    """A sharded tiny Llama folder."""
    return save_model(tiny_llama(), tmp_path_factory.mktemp("models") / "base")


@pytest.fixture(scope="module", name="adapter")
def adapter_fixture(base: Path, tmp_path_factory) -> Path:
    """A LoRA adapter on ``base``."""
    return save_adapter(base, tmp_path_factory.mktemp("adapters") / "lora")
