"""A world of inputs for the bad-input suite: tiny good checkpoints and data, and broken copies
(truncated, lying headers, NaN/Inf, wrong shapes or vocabulary, pickle-only, no tokenizer), bad
data files and YAML configs. Everything lives under one folder so its hash proves nothing
changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch
from recover_support import (
    HARMFUL,
    TASK_PROMPTS,
    make_adapter,
    make_pair,
    save_model,
    tiny_tokenizer,
)
from recover_support import tiny_config as recover_config
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and every folder, as an empty marker)."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return hashes


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _raw(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_raw(file: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _variant(good: Path, folder: Path, change) -> Path:
    """A copy of ``good`` with ``change(folder)`` applied."""
    shutil.copytree(good, folder)
    change(folder)
    return folder


def _edit_header(edit):
    def change(folder: Path) -> None:
        header, body = _raw(_weights(folder))
        edit(header)
        _write_raw(_weights(folder), header, body)

    return change


def _edit_tensors(edit):
    def change(folder: Path) -> None:
        tensors = load_file(_weights(folder))
        edit(tensors)
        save_file(tensors, str(_weights(folder)), metadata={"format": "pt"})

    return change


def _set_element(name: str, value: float):
    def edit(tensors: dict) -> None:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[7] = value

    return _edit_tensors(edit)


def _smaller_vocab(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] -= 8
    (folder / "config.json").write_text(json.dumps(config))
    _edit_tensors(
        lambda t: t.update(
            {n: t[n][:-8].clone() for n in ("model.embed_tokens.weight", "lm_head.weight")}
        )
    )(folder)


def _pickle_only(folder: Path) -> None:
    state = load_file(_weights(folder))
    _weights(folder).unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _truncate(folder: Path) -> None:
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(data[: len(data) - 1000])


def _huge_header_length(folder: Path) -> None:
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(struct.pack("<Q", 2**60) + data[8:])


def _no_tokenizer(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)


def build_models(root: Path) -> dict[str, Path]:
    aligned, finetuned = make_pair(root, layers=2)
    models = {"aligned": aligned, "finetuned": finetuned}
    models["adapter"] = make_adapter(root, aligned)
    models["unaligned"] = _variant(
        finetuned, root / "unaligned", _edit_tensors(lambda t: t[Q0].mul_(1.5))
    )
    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    wide = LlamaForCausalLM(recover_config(tokenizer, layers=2, hidden=48))
    models["other_base"] = save_model(wide, tokenizer, root / "other_base")
    variants = {
        "truncated": _truncate,
        "past_end": _edit_header(lambda h: h[Q0].update(data_offsets=[0, 10**9])),
        "huge_header": _huge_header_length,
        "overlap": _edit_header(lambda h: h[O0].update(data_offsets=h[Q0]["data_offsets"])),
        "shape_lie": _edit_header(lambda h: h[Q0].update(shape=[10**6, 10**6])),
        "nan": _set_element(UP1, float("nan")),
        "inf": _set_element(UP1, float("inf")),
        "wrong_shape": _edit_tensors(lambda t: t.update({UP1: t[UP1][:-1].clone()})),
        "small_vocab": _smaller_vocab,
        "pickle": _pickle_only,
        "no_tokenizer": _no_tokenizer,
    }
    for name, change in variants.items():
        models[name] = _variant(finetuned, root / name, change)
    return models


def build_data(root: Path) -> dict[str, Path]:
    root.mkdir()
    data = {
        "harmful": _write_jsonl(root / "harmful.jsonl", [{"prompt": p} for p in HARMFUL]),
        "task": _write_jsonl(
            root / "task.jsonl", [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
        ),
        "pairs": _write_jsonl(
            root / "pairs.jsonl", [{"prompt": p, "response": "sure"} for p in TASK_PROMPTS]
        ),
        "empty": root / "empty.jsonl",
        "malformed": root / "malformed.jsonl",
        "binary": root / "binary.jsonl",
        "no_prompt_csv": root / "no_prompt.csv",
        "no_answer_csv": root / "no_answer.csv",
        "list_rows": _write_jsonl(root / "list_rows.jsonl", [[1, 2], [3]]),
        "bad_messages": _write_jsonl(
            root / "bad_messages.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}]
        ),
    }
    data["empty"].write_text("")
    data["malformed"].write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    data["binary"].write_bytes(bytes(range(256)) * 4)
    data["no_prompt_csv"].write_text("text,label\nhello,1\n")
    data["no_answer_csv"].write_text("prompt,label\nsum of 2 and 3,1\n")
    return data


def build_configs(root: Path, models: dict[str, Path], data: dict[str, Path]) -> dict[str, Path]:
    root.mkdir()
    ties = {
        "merge_method": "linear",
        "models": [
            {"model": str(models["aligned"]), "parameters": {"weight": 0.5}},
            {"model": str(models["finetuned"]), "parameters": {"weight": 0.5}},
        ],
    }
    retrain = {"aligned": str(models["aligned"]), "data": str(data["pairs"]), "epochs": 1}
    files = {
        "merge_unknown_key": {**ties, "merge_methd": "ties"},
        "merge_missing_model": {
            **ties,
            "models": [
                *ties["models"],
                {"model": str(root.parent / "gone"), "parameters": {"weight": 1}},
            ],
        },
        "merge_negative_density": {
            **ties,
            "merge_method": "ties",
            "base_model": str(models["aligned"]),
            "parameters": {"density": -0.5},
        },
        "merge_nan_input": {
            **ties,
            "models": [
                ties["models"][0],
                {"model": str(models["nan"]), "parameters": {"weight": 0.5}},
            ],
        },
        "retrain_unknown_key": {**retrain, "learning_rate": 0.1},
        "compare_unknown_key": {"aligned": str(models["aligned"]), "finetuned_model": "x"},
    }
    paths = {}
    for name, content in files.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(json.dumps(content))  # JSON is YAML
    paths["malformed_yaml"] = root / "malformed.yaml"
    paths["malformed_yaml"].write_text("models: [\n  - {model: a\n")
    paths["not_a_mapping"] = root / "list.yaml"
    paths["not_a_mapping"].write_text("- 1\n- 2\n")
    return paths
