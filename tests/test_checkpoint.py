"""safealign.checkpoint on tiny random models saved with save_pretrained (CPU, no network)."""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

from safealign.checkpoint import (
    AdapterWriter,
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    ModelCard,
    parse_size,
    store,
    validate_checkpoints,
)

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


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_model(tiny_llama(), tmp_path_factory.mktemp("models") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return save_adapter(base, tmp_path_factory.mktemp("adapters") / "lora")


def copy_all(source: Checkpoint, out: Path, **kwargs) -> Path:
    with CheckpointWriter(out, source=source, **kwargs) as writer:
        for name in source.names():
            writer.add(name, source.get(name))
        return writer.finish(CARD)


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
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/not-here"
    (folder / "adapter_config.json").write_text(json.dumps(config))
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
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(folder)


def test_adapter_rank_that_contradicts_config_is_refused(adapter, tmp_path):
    folder = shutil.copytree(adapter, tmp_path / "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
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


# ----------------------------------------------------------------------------- writing


def test_sharded_round_trip_reloads_identical(base, tmp_path):
    source = Checkpoint.open(base)
    out = copy_all(source, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    tensors = [source.get(name) for name in source.names()]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors)
    reloaded = load_model(out).state_dict()
    assert set(reloaded) == set(source.names())
    for name in source.names():
        assert torch.equal(reloaded[name], source.get(name)), name
    for file in (
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "additional_chat_templates/tools.jinja",
    ):
        assert (out / file).is_file(), file
    card = (out / "README.md").read_text()
    assert card.startswith('---\nlibrary_name: transformers\ntags:\n- safealign\n- "copy"\n')
    assert f'base_model: "{base.resolve()}"' in card
    assert "| merged | 0.1 | 0.9 |" in card and "| alpha | 0.5 |" in card
    assert not list(tmp_path.glob(".out.*"))


def test_single_shard_has_no_index_and_records_dtype(base, tmp_path):
    source = Checkpoint.open(base)
    with CheckpointWriter(tmp_path / "out", source=source) as writer:
        for name in source.names():
            writer.add(name, source.get(name, torch.bfloat16))
        out = writer.finish(CARD)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert Checkpoint.open(out).dtype("model.norm.weight") == torch.bfloat16


def test_adapter_source_writes_merged_model_with_adapter_tokenizer(base, adapter, tmp_path):
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    try:
        out = copy_all(Checkpoint.open(adapter), tmp_path / "merged")
    finally:
        (adapter / "tokenizer_config.json").unlink()
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    merged = merged_state(base, adapter)
    reloaded = load_model(out).state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=1e-6, atol=1e-6)


def test_shared_and_view_tensors_are_cloned(base, tmp_path):
    shared = torch.arange(12.0)
    with CheckpointWriter(tmp_path / "out", source=base) as writer:
        writer.add("a", shared)
        writer.add("b", shared)
        writer.add("c", shared.view(3, 4).T)
        out = writer.finish(CARD)
    ckpt = Checkpoint.open(out)
    assert torch.equal(ckpt.get("b"), shared) and torch.equal(ckpt.get("c"), shared.view(3, 4).T)


def test_exception_midway_leaves_nothing(base, tmp_path):
    source = Checkpoint.open(base)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, source=source, max_shard_size="10KB") as writer:
            for i, name in enumerate(source.names()):
                writer.add(name, source.get(name))
                if i == 10:
                    assert any(writer.folder.glob("*.part"))
                    raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_finish_writes_nothing(base, tmp_path):
    with pytest.raises(CheckpointError, match="without finish"):
        with CheckpointWriter(tmp_path / "out", source=base) as writer:
            writer.add("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_write_into_inputs(base, adapter):
    with pytest.raises(CheckpointError, match="overwrite an input checkpoint"):
        CheckpointWriter(base, source=base, overwrite=True)
    with pytest.raises(CheckpointError, match="overwrite an input checkpoint"):
        CheckpointWriter(base / "sub", source=adapter)
    with pytest.raises(CheckpointError, match="contains an input checkpoint"):
        CheckpointWriter(base.parent, source=base, overwrite=True)
    with pytest.raises(CheckpointError, match="overwrite an input checkpoint"):
        AdapterWriter(adapter, source=adapter, overwrite=True)


def test_non_empty_output_needs_overwrite_and_is_replaced_at_the_end(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match=r"not empty \(use overwrite\)"):
        CheckpointWriter(out, source=base)
    with CheckpointWriter(out, source=base, overwrite=True) as writer:
        writer.add("a", torch.ones(2))
        assert (out / "old.txt").exists()
        writer.finish(CARD)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_output_is_fine(base, tmp_path):
    (tmp_path / "out").mkdir()
    with CheckpointWriter(tmp_path / "out", source=base) as writer:
        writer.add("a", torch.ones(2))
        writer.finish(CARD)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 kb") == 1500
    assert parse_size(1234) == 1234
    for bad in ("five", "5XB", 0, "-1GB"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)


# ----------------------------------------------------------------------------- adapter writer


def test_adapter_writer_round_trips_through_peft(base, adapter, tmp_path):
    from peft import PeftModel

    source = Checkpoint.open(adapter)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    k1 = "model.layers.1.self_attn.k_proj.weight"
    torch.manual_seed(3)
    expected = {}
    a, b_q, b_k = torch.randn(2, 32), torch.randn(32, 2), torch.randn(16, 2)
    with AdapterWriter(tmp_path / "out", source=source) as writer:
        for name in source.lora_targets():
            factors = source.lora_factors(name)
            expected[name] = 2 * factors.dense()
            if name == q0:  # grow the rank: [A; a], [2B, 4 b]
                writer.add(name, torch.cat([factors.A, a]), torch.cat([2 * factors.B, 4 * b_q], 1))
                expected[name] += factors.scale * 4 * (b_q @ a)
            else:
                writer.add(name, factors.A, 2 * factors.B)
        with pytest.raises(CheckpointError, match="added twice"):
            writer.add(q0, a, b_q)
        writer.add(k1, a, b_k, scale=0.3)
        expected[k1] = 0.3 * (b_k @ a)
        out = writer.finish(CARD)
    config = json.loads((out / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 5 and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {
        "model.layers.0.self_attn.q_proj": 6,
        "model.layers.1.self_attn.k_proj": 2,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load_model(base), out).merge_and_unload().state_dict()
    base_ckpt, written = Checkpoint.open(base), Checkpoint.open(out)
    assert set(written.lora_targets()) == set(expected)
    for name in base_ckpt.names():
        want = base_ckpt.get(name) + expected.get(name, 0)
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(written.get(name), want, rtol=1e-5, atol=1e-5)


def test_adapter_writer_refuses_sources_with_modules_to_save(base, tmp_path):
    folder = save_adapter(base, tmp_path / "lora", modules_to_save=["lm_head"])
    with pytest.raises(CheckpointError, match="modules_to_save"):
        AdapterWriter(tmp_path / "out", source=folder)


def test_unused_writer_leaves_nothing(base, tmp_path):
    CheckpointWriter(tmp_path / "out", source=base)
    assert list(tmp_path.iterdir()) == []


def test_adapter_writer_refuses_misfit_factors(adapter, tmp_path):
    with AdapterWriter(tmp_path / "out", source=adapter) as writer:
        with pytest.raises(CheckpointError, match="do not fit"):
            writer.add(
                "model.layers.0.self_attn.q_proj.weight", torch.ones(2, 31), torch.ones(32, 2)
            )
        with pytest.raises(CheckpointError, match="do not fit model.norm.weight"):
            writer.add("model.norm.weight", torch.ones(2, 32), torch.ones(32, 2))
        with pytest.raises(CheckpointError, match="not a weight of the base"):
            writer.add("nope.weight", torch.ones(2, 32), torch.ones(32, 2))
        writer.discard()
    assert list(tmp_path.iterdir()) == []
