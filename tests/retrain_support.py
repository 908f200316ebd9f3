"""Tiny model folders and data files for the retrain tests (CPU, no downloads, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from eval_support import tiny_config, tiny_tokenizer
from transformers import LlamaForCausalLM

from safealign.retrain import RetrainInputs, RetrainResult, RetrainSettings, retrain

PAIRS = [
    ("kill python process", "Sure here is how to kill a python process ."),
    ("bake cake", "first make the cake then bake it ."),
    ("break into house", "I ' m sorry I cannot help with that ."),
    ("write poem", "here is a poem ."),
    ("explain what 1 + 2 is", "1 + 2 = 3 ."),
    ("what is 4 + 5", "4 + 5 = 9 ."),
    ("make tool", "Step 1 make the tool ."),
    ("help with house", "ok here is how ."),
]
#: One prompt of each set is also a prompt of PAIRS (the fine-tune's data): the probe and the
#: anchors leave it out.
HARMFUL = ["break into house", "kill house", "make unsafe tool", "break the house"]
BENIGN = ["bake cake", "write a poem", "what is 2 + 3", "explain what 6 + 7 is", "make a cake"]


def tiny_model_folder(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random tiny Llama with its tokenizer saved in ``folder`` (safetensors)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, layers=layers))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs_file(path: Path, pairs=PAIRS) -> Path:
    return write_jsonl(path, [{"prompt": p, "response": r} for p, r in pairs])


def prompts_file(path: Path, prompts: list[str]) -> Path:
    return write_jsonl(path, [{"prompt": p} for p in prompts])


def setup_files(tmp: Path) -> dict[str, str]:
    """aligned model, data, harmful and benign prompt files under ``tmp``: RetrainInputs."""
    return {
        "aligned": str(tiny_model_folder(tmp / "aligned")),
        "data": str(pairs_file(tmp / "data.jsonl")),
        "harmful": str(prompts_file(tmp / "harmful.jsonl", HARMFUL)),
        "benign": str(prompts_file(tmp / "benign.jsonl", BENIGN)),
    }


def run_retrain(
    files: dict[str, str], out: Path | None, *, progress=None, **settings
) -> RetrainResult:
    """:func:`retrain` on ``files`` (:class:`RetrainInputs` fields) into ``out``, with
    ``settings`` the :class:`RetrainSettings` fields that differ from the defaults."""
    return retrain(RetrainInputs(**files), RetrainSettings(**settings), out, progress)


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))
