"""safealign.checkpoint writing: model folders and adapters, atomically (CPU, offline)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from checkpoint_support import (  # noqa: F401 (the *_fixture names are pytest fixtures)
    CARD,
    adapter_fixture,
    base_fixture,
    copy_all,
    load_model,
    merged_state,
    save_adapter,
)

from safealign.checkpoint import (
    ADAPTER_CONFIG_NAME,
    AdapterWriter,
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    parse_size,
)

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
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
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
