"""Tiny Llama checkpoints for the merge tests: aligned, unaligned, fine-tuned, LoRAs on aligned."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from checkpoint_support import tiny_llama
from safetensors.torch import load_file


@dataclass
class TinyModels:
    aligned: Path
    unaligned: Path
    finetuned: Path
    other: Path
    lora: Path
    safety_lora: Path


def _perturbed(base_folder: Path, out: Path, scale: float, seed: int) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    return out


def _lora(base_folder: Path, out: Path, seed: int, targets: list[str], r: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(out)
    return out


def build_tiny_models(root: Path) -> TinyModels:
    aligned = root / "aligned"
    tiny_llama(
        0,
        vocab_size=96,
        intermediate_size=48,
        num_hidden_layers=3,
        max_position_embeddings=64,
    ).save_pretrained(aligned)
    return TinyModels(
        aligned=aligned,
        unaligned=_perturbed(aligned, root / "unaligned", 0.05, 1),
        finetuned=_perturbed(aligned, root / "finetuned", 0.02, 2),
        other=_perturbed(aligned, root / "other", 0.02, 3),
        lora=_lora(aligned, root / "lora", 4, ["q_proj", "v_proj", "down_proj"], 4),
        safety_lora=_lora(aligned, root / "safety_lora", 5, ["q_proj", "v_proj"], 2),
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or shards), in fp32."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.float() for k, v in load_file(file).items()})
    return tensors
