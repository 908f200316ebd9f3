"""What every lab build does with its models: wrap one in a fresh LoRA adapter, save a model
or adapter folder with its card, point an adapter at its base."""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from safealign.checkpoint import ADAPTER_CONFIG_NAME

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def with_lora(model, rank: int, alpha: int, seed: int):
    """A PEFT LoRA wrapper around a copy of ``model`` (adapter initialised from ``seed``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft calls a deprecated transformers property
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(copy.deepcopy(model), lora_config)


def save_folder(model, tokenizer, folder: Path, card: str, *, adapter: bool) -> None:
    """Save a model folder (with the tokenizer) or an adapter folder, and its model card."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if not adapter:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card)


def point_adapter(folder: Path, base: Path) -> None:
    """Set an adapter's ``base_model_name_or_path`` to ``base`` (absolute)."""
    config_file = folder / ADAPTER_CONFIG_NAME
    adapter_config = json.loads(config_file.read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def stage_logger(
    key: str, say: Callable[[str], None], timings: dict[str, float]
) -> Callable[[str, float], float]:
    """``stage(name, since) -> now``: records ``name``'s seconds since ``since`` in ``timings``
    and logs one line; a build chains it, each stage timed from the end of the one before."""

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        say(f"lab {key}: {name} done in {timings[name]:.1f}s")
        return now

    return stage
