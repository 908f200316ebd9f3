"""safealign.checkpoint reading and validation on tiny random models (CPU, no network)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_support import (  # noqa: F401 (the *_fixture names are pytest fixtures)
    CARD,
    adapter_fixture,
    base_fixture,
    load_model,
    merged_state,
    save_adapter,
    save_model,
    tiny_llama,
)

from safealign.checkpoint import (
    ADAPTER_CONFIG_NAME,
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    store,
    validate_checkpoints,
)

# ----------------------------------------------------------------------------- reading


def test_open_sharded_model_reads_headers_and_tensors(base):
    ckpt = Checkpoint.open(base)
    state = load_model(base).state_dict()
    assert len(list(base.glob("*.safetensors"))) > 1  # the reads below span shards
    assert set(ckpt.names()) == set(state)
    name = "model.layers.1.mlp.up_proj.weight"
    assert ckpt.shape(name) == (64, 32)
    assert ckpt.dtype(name) == torch.float32
    assert torch.equal(ckpt.get(name), state[name])
    assert ckpt.get(name, torch.bfloat16).dtype == torch.bfloat16
    assert not ckpt.is_adapter and ckpt.vocab_size == 128 and ckpt.model_type == "llama"


def test_get_returns_an_independent_copy(base):
    ckpt = Checkpoint.open(base)
    name = "model.norm.weight"
    first = ckpt.get(name)
    expected = first.clone()
    first.add_(100.0)
    assert torch.equal(ckpt.get(name), expected)


def test_tied_embeddings_list_only_stored_tensors(tmp_path):
    folder = save_model(tiny_llama(tie_word_embeddings=True), tmp_path / "tied")
    ckpt = Checkpoint.open(folder)
    assert "lm_head.weight" not in ckpt and "model.embed_tokens.weight" in ckpt
    with pytest.raises(KeyError, match="lm_head"):
        ckpt.get("lm_head.weight")


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"layers.1.self_attn.q_proj": 3}},
        {"target_modules": ["q_proj", "embed_tokens"]},
        {"modules_to_save": ["lm_head"]},
    ],
    ids=["plain", "rslora", "patterns", "embedding", "modules_to_save"],
)
def test_adapter_effective_weights_equal_merge_and_unload(base, tmp_path, lora):
    folder = save_adapter(base, tmp_path / "lora", **lora)
    ckpt = Checkpoint.open(folder)
    merged = merged_state(base, folder)
    assert ckpt.is_adapter and ckpt.base.path == base.resolve()
    assert ckpt.config == Checkpoint.open(base).config
    assert set(ckpt.names()) == set(merged)
    targets = ckpt.lora_targets()
    assert targets and all(n.endswith(".weight") for n in targets)
    base_ckpt = Checkpoint.open(base)
    for name in ckpt.names():
        torch.testing.assert_close(ckpt.get(name), merged[name], rtol=1e-6, atol=1e-6)
        if name in targets or name in ckpt.replaced_names():
            assert not torch.allclose(ckpt.get(name), base_ckpt.get(name))


def test_adapter_scales_follow_config(base, tmp_path):
    folder = save_adapter(base, tmp_path / "lora", use_rslora=True, r=4, lora_alpha=6)
    factors = Checkpoint.open(folder).lora_factors("model.layers.0.self_attn.q_proj.weight")
    assert factors.scale == pytest.approx(6 / 2)
    assert factors.A.shape == (4, 32) and factors.B.shape == (16 * 2, 4)
    assert Checkpoint.open(folder).lora_factors("model.norm.weight") is None


def test_fan_in_fan_out_adapter_equals_merge_and_unload(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    base = save_model(GPT2LMHeadModel(config), tmp_path / "gpt2", max_shard_size="5GB")
    folder = save_adapter(base, tmp_path / "lora", target_modules=["c_attn"], fan_in_fan_out=True)
    ckpt, merged = Checkpoint.open(folder), merged_state(base, folder)
    name = "transformer.h.1.attn.c_attn.weight"
    assert ckpt.lora_factors(name).dense().shape == ckpt.shape(name) == (32, 96)
    for name in ckpt.lora_targets():
        torch.testing.assert_close(ckpt.get(name), merged[name], rtol=1e-6, atol=1e-6)


def test_adapter_base_can_be_given_explicitly(base, adapter, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(base, moved)
    assert Checkpoint.open(adapter, base=moved).base.path == moved.resolve()


def test_adapter_with_missing_base_says_pass_base(adapter, tmp_path):
    folder = shutil.copytree(adapter, tmp_path / "lora")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = "org/not-here"
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a local folder, pass base="):
        Checkpoint.open(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_dora": True}, "unsupported LoRA variant DoRA"),
        ({"peft_type": "IA3"}, "unsupported adapter type IA3"),
        ({"lora_bias": True}, "unsupported LoRA variant lora_bias"),
        ({"kasa_config": {"k": 1}}, "unsupported LoRA variant KaSA"),
        ({"init_lora_weights": "mica"}, "unsupported LoRA variant MiCA"),
    ],
)
def test_unsupported_adapters_are_refused(adapter, tmp_path, change, message):
    folder = shutil.copytree(adapter, tmp_path / "lora")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    config.update(change)
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(folder)


def test_adapter_rank_that_contradicts_config_is_refused(adapter, tmp_path):
    folder = shutil.copytree(adapter, tmp_path / "lora")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    config["r"] = 8
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit base weight"):
        Checkpoint.open(folder)


# ----------------------------------------------------------------------------- validation


def test_valid_pair_passes(base, adapter, tmp_path):
    other = save_model(tiny_llama(seed=5), tmp_path / "other")
    validate_checkpoints(base, other, adapter)


def test_missing_config_names_the_folder(base, tmp_path):
    folder = shutil.copytree(base, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config.json: .*/m$"):
        Checkpoint.open(folder)


def test_no_weights_and_pickle_only(base, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(base / "config.json", folder)
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        Checkpoint.open(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"pickle-only checkpoint.*pytorch_model\.bin$"):
        Checkpoint.open(folder)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"\x05\x00",
        lambda data: struct.pack("<Q", 10**12) + data[8:],
        lambda data: data[:8] + b"{not json" + data[17:],
        lambda data: data[: len(data) // 2],
    ],
    ids=["too-short", "huge-length", "bad-json", "truncated"],
)
def test_corrupt_safetensors_header_names_the_file(tmp_path, damage):
    folder = save_model(tiny_llama(), tmp_path / "m", max_shard_size="5GB")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=r"safetensors.*: .*model\.safetensors$"):
        Checkpoint.open(folder)


def test_missing_shard_listed_in_index(base, tmp_path):
    folder = shutil.copytree(base, tmp_path / "m")
    shard = sorted(folder.glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard.*{shard.name}$"):
        Checkpoint.open(folder)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_architecture_and_vocab_mismatch(base, tmp_path):
    other = shutil.copytree(base, tmp_path / "other")
    _edit_config(other, model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=256)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoints(base, other)
    lines = str(err.value).splitlines()
    assert any(line.startswith("architecture differs, llama (LlamaForCausalLM)") for line in lines)
    assert any(line.startswith("vocab_size differs, 128 vs 256") for line in lines)
    assert all(line.endswith(f"{base.resolve()} vs {other.resolve()}") for line in lines)


def test_name_and_shape_mismatches_are_listed(base, tmp_path, monkeypatch):
    source = Checkpoint.open(base)
    out = tmp_path / "other"
    with CheckpointWriter(out, source=source) as writer:
        for name in source.names():
            if name.startswith("model.layers.1.self_attn"):
                continue
            tensor = source.get(name)
            if name.endswith("mlp.down_proj.weight"):
                tensor = tensor[:, :48]
            writer.add(name, tensor)
        writer.add("extra.weight", torch.zeros(2))
        writer.finish(CARD)
    opened = []  # validation reads headers only: no safetensors file is opened for data
    monkeypatch.setattr(store, "safe_open", lambda *args, **kwargs: opened.append(args))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoints(base, out)
    assert opened == []
    names_line, shapes_line = str(err.value).splitlines()
    assert names_line.startswith("tensor names differ, 4 only in first (model.layers.1.self_attn")
    assert "and 1 more), 1 only in second (extra.weight)" in names_line
    assert shapes_line.startswith("2 shapes differ (model.layers.0.mlp.down_proj.weight [32, 64]")


def test_validation_on_selected_names(base, tmp_path):
    other = save_model(tiny_llama(num_hidden_layers=1), tmp_path / "short")
    wanted = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    validate_checkpoints(base, other, names=wanted[:1])
    with pytest.raises(CheckpointError, match=r"^1 tensors missing \(model.layers.1.self_attn"):
        validate_checkpoints(base, other, names=wanted)
