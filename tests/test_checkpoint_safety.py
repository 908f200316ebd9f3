"""Untrusted checkpoints: lying safetensors headers, NaN and Inf tensors, pickles (refused unless
allowed, then read with weights_only), and the writers' disk check (CPU, tiny models)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoint_support import CARD, copy_all, save_model, tiny_llama
from safetensors.torch import load_file, save_file

from safealign import resources
from safealign.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    allow_pickle,
    check_finite,
    pickle_allowed,
)

Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(name="model")
def model_fixture(tmp_path) -> Path:
    return save_model(tiny_llama(), tmp_path / "m", max_shard_size="5GB")


def _rewrite_header(file: Path, edit) -> None:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h[O0].update(data_offsets=h[Q0]["data_offsets"]), "overlaps"),
        (lambda h: h[Q0].update(shape=[2**40, 2**40]), r"F32 \[1099511627776, 1.*\] does not fill"),
        (lambda h: h[Q0].update(dtype="BF16"), r"BF16 \[.*\] does not fill"),
        (lambda h: h[Q0].update(shape=[-32, -32]), "does not fill"),
        (lambda h: h[Q0].update(data_offsets=[0, 2**62]), "lies outside the file"),
        (lambda h: h[Q0].update(data_offsets=[8.0, 4104.0]), "bad entry"),
        (lambda h: h[Q0].update(shape=["32", 32]), "bad entry"),
        (lambda h: h[Q0].update(dtype="F128"), "dtype 'F128'"),
    ],
    ids=["overlap", "huge-shape", "dtype-size", "negative-shape", "past-end", "float-offsets",
         "text-dim", "unknown-dtype"],
)  # fmt: skip
def test_a_lying_header_is_refused_before_any_tensor_is_read(model, edit, message):
    weights = model / "model.safetensors"
    _rewrite_header(weights, edit)
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors header \(.*({message}).*\): "):
        Checkpoint.open(model)


@pytest.mark.parametrize(("value", "kind"), [(float("nan"), "NaN"), (float("-inf"), "Inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_are_refused_as_read_naming_tensor_and_file(model, value, kind, dtype):
    weights = model / "model.safetensors"
    tensors = {k: v.to(dtype) for k, v in load_file(weights).items()}
    tensors[Q0].view(-1)[[5, 9]] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    ckpt = Checkpoint.open(model)
    ckpt.get(O0)  # the other tensors read fine
    message = rf"tensor {Q0} holds 2 non-finite values \({kind} at flat index 5\): {weights}$"
    with pytest.raises(CheckpointError, match=message):
        ckpt.get(Q0)
    with pytest.raises(CheckpointError, match=message):
        ckpt.get(Q0, torch.float32)


def test_a_large_but_finite_tensor_passes_the_check():
    big = torch.full((1000,), 6e4, dtype=torch.float16)  # its fp16 sum overflows to inf
    check_finite(big, "big", "here")
    big[3] = float("inf")
    with pytest.raises(CheckpointError, match=r"tensor big holds 1 non-finite values \(Inf at"):
        check_finite(big, "big", "here")


def test_the_writer_refuses_a_non_finite_tensor_and_writes_nothing(model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"tensor {Q0} holds 1 non-finite .*: output {out}"):
        with CheckpointWriter(out, source=model) as writer:
            bad = torch.zeros(4)
            bad[1] = float("nan")
            writer.add(Q0, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _pickle_copy(model: Path, folder: Path) -> Path:
    shutil.copytree(model, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickles_are_refused_unless_allowed_then_read_with_weights_only(model, tmp_path):
    folder = _pickle_copy(model, tmp_path / "p")
    with pytest.raises(CheckpointError, match=r"pickle-only .*--allow-pickle.*pytorch_model\.bin$"):
        Checkpoint.open(folder)
    assert not pickle_allowed()
    with allow_pickle():
        assert pickle_allowed()
        with allow_pickle(False):
            assert not pickle_allowed()
        ckpt = Checkpoint.open(folder)
        reference = Checkpoint.open(model)
        assert ckpt.names() == reference.names()
        for name in reference.names():
            assert torch.equal(ckpt.get(name), reference.get(name))
            assert ckpt.dtype(name) == reference.dtype(name)
    assert not pickle_allowed()


def test_an_allowed_pickle_that_would_run_code_is_refused(model, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    folder = _pickle_copy(model, tmp_path / "p")
    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    with allow_pickle(), pytest.raises(CheckpointError, match=r"cannot read pickle weights"):
        Checkpoint.open(folder)


def test_pickle_adapter_is_read_only_when_allowed(tmp_path):
    from checkpoint_support import save_adapter

    base = save_model(tiny_llama(), tmp_path / "base", max_shard_size="5GB")
    adapter = save_adapter(base, tmp_path / "lora")
    expected = Checkpoint.open(adapter).get(Q0)
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"pickle-only .*adapter_model\.bin$"):
        Checkpoint.open(adapter)
    with allow_pickle():
        assert torch.equal(Checkpoint.open(adapter).get(Q0), expected)


def test_the_writer_refuses_a_disk_without_room_before_writing(model, tmp_path, monkeypatch):
    need = resources.tensor_bytes(Checkpoint.open(model))
    monkeypatch.setattr(resources, "free_disk", lambda path: need - 1)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"not enough disk space for the output: .*: {out}$"):
        CheckpointWriter(out, source=model)
    monkeypatch.setattr(resources, "free_disk", lambda path: need)
    copy_all(Checkpoint.open(model), out)
    assert (out / "model.safetensors").is_file()


def test_a_shard_is_not_written_when_the_disk_filled_meanwhile(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    source = Checkpoint.open(model)
    with pytest.raises(CheckpointError, match="not enough disk space"):
        with CheckpointWriter(out, source=source, max_shard_size="10KB") as writer:
            monkeypatch.setattr(resources, "free_disk", lambda path: 100)
            for name in source.names():
                writer.add(name, source.get(name))
            writer.finish(CARD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_memory_and_disk_estimates_and_checks(tmp_path, monkeypatch):
    estimate = resources.Estimate(memory=int(1.1e9 * 1.2), disk=5 * 10**8).at(tmp_path / "o")
    assert estimate.out == (tmp_path / "o").absolute()
    monkeypatch.setattr(resources, "available_memory", lambda: 10**9)
    monkeypatch.setattr(resources, "free_disk", lambda path: 10**12)
    assert estimate.describe() == (
        f"memory ~1.3 GB (1.0 GB available), disk ~500.0 MB (1.0 TB free at {tmp_path})"
    )
    with pytest.raises(
        resources.ResourceError, match="not enough memory for recover: needs ~1.3 GB"
    ):
        estimate.check("recover")
    monkeypatch.setattr(resources, "available_memory", lambda: None)
    estimate.check("recover")  # memory unknown: no refusal
    monkeypatch.setattr(resources, "free_disk", lambda path: 10**8)
    with pytest.raises(
        resources.ResourceError, match=rf"disk space for merge: .*: {tmp_path / 'o'}$"
    ):
        estimate.check("merge")


def test_available_memory_reads_meminfo_without_psutil(monkeypatch, tmp_path):
    import builtins
    import sys

    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "psutil", raising=False)

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2048 kB\nMemAvailable:    1024 kB\n")
    monkeypatch.setattr(resources, "MEMINFO", meminfo)
    assert resources.available_memory() == 1024 * 1024
    meminfo.write_text("MemTotal: 2048 kB\n")
    assert resources.available_memory() is None


def test_free_disk_looks_at_the_nearest_existing_folder(tmp_path):
    assert resources.free_disk(tmp_path / "a" / "b") == shutil.disk_usage(tmp_path).free


def test_leftovers_of_killed_writers_are_cleaned_by_the_next_run(model, tmp_path):
    out = tmp_path / "out"
    dead = 2**22 + 7  # above Linux's largest process id: no such process
    stale_tmp = tmp_path / f".out.tmp-{dead}-0a1b2c3d"
    live_tmp = tmp_path / f".out.tmp-{os.getpid()}-0a1b2c3d"
    for folder in (stale_tmp, live_tmp):
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
    copy_all(Checkpoint.open(model), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live_tmp.name, "m", "out"]


def test_an_output_a_kill_took_away_mid_commit_is_put_back(model, tmp_path):
    out = tmp_path / "out"
    copy_all(Checkpoint.open(model), out)
    old = tmp_path / f".out.old-{2**22 + 7}-0a1b2c3d"
    out.rename(old)  # killed between "out -> old" and "tmp -> out"
    with pytest.raises(CheckpointError, match="not empty"):
        CheckpointWriter(out, source=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    assert Checkpoint.open(out).names() == Checkpoint.open(model).names()


def test_streaming_estimate_counts_the_largest_tensor_per_input(model, tmp_path):
    ckpt = Checkpoint.open(model)
    largest = max(
        ckpt.shape(n)[0] * (ckpt.shape(n)[1] if len(ckpt.shape(n)) > 1 else 1) for n in ckpt.names()
    )
    estimate = resources.streaming_estimate([ckpt, ckpt], written=123, out=tmp_path / "o")
    held = largest * 4 * 4  # two inputs, the fp32 result and its stored copy
    assert estimate.memory == int(held * resources.MEMORY_MARGIN) + resources.RUNTIME_BYTES
    assert (estimate.disk, estimate.out) == (123, tmp_path / "o")
