"""Writing a PEFT LoRA adapter folder from per-weight factors, atomically."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from safealign.checkpoint.card import ModelCard
from safealign.checkpoint.files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TOKENIZER_FILES,
    CheckpointError,
)
from safealign.checkpoint.lora import PEFT_PREFIX, is_embedding, lora_alpha, lora_scale
from safealign.checkpoint.reader import Checkpoint
from safealign.checkpoint.store import check_finite
from safealign.checkpoint.writer import FolderWriter, copy_files, owned
from safealign.paths import has_tokenizer


def _alphas(ranks: dict[str, tuple[int, float]], rslora: bool) -> dict[str, int | float]:
    """lora_alpha per module giving each module's scale."""
    return {module: lora_alpha(scale, r, rslora) for module, (r, scale) in ranks.items()}


class AdapterWriter(FolderWriter):
    """Write a PEFT LoRA adapter folder from per-weight factors, atomically.

    Factors are given in :class:`~safealign.checkpoint.lora.LowRank` orientation
    (``delta = scale * B @ A`` on the stored base weight). The adapter_config.json is the
    source adapter's, with ``r``, ``lora_alpha`` and per-module patterns set so that PEFT
    reproduces each scale exactly.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        source: Checkpoint | str | Path,
        overwrite: bool = False,
        inputs: Iterable[Checkpoint | str | Path] = (),
        base_model: str | Path | None = None,
    ):
        self.source = Checkpoint.open(source)
        if not self.source.is_adapter:
            raise CheckpointError(f"AdapterWriter needs an adapter as source: {self.source.path}")
        if self.source.adapter_config.get("modules_to_save"):
            raise CheckpointError(
                f"source adapter has modules_to_save, which a LoRA-only output would drop: "
                f"{self.source.path / ADAPTER_CONFIG_NAME}"
            )
        self.base_model = str(base_model) if base_model is not None else None
        super().__init__(out, [self.source, *inputs], overwrite)
        self._tensors: dict[str, torch.Tensor] = {}
        self._ranks: dict[str, tuple[int, float]] = {}

    def _check_factors(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        if name not in self.source.base:
            raise CheckpointError(
                f"{name} is not a weight of the base model: {self.source.base.path}"
            )
        if not name.endswith(".weight"):
            raise CheckpointError(f"LoRA targets weights, got {name}: {self.out}")
        if name.removesuffix(".weight") in self._ranks:
            raise CheckpointError(f"factors for {name} added twice: {self.out}")
        out_in = self.source.base.shape(name)
        fits = len(out_in) == 2 and A.dim() == 2 and B.dim() == 2
        if not fits or tuple(B.shape) != (out_in[0], A.shape[0]) or A.shape[1] != out_in[1]:
            raise CheckpointError(
                f"factors A {list(A.shape)}, B {list(B.shape)} do not fit {name} {list(out_in)}: "
                f"{self.out}"
            )

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float | None = None) -> None:
        """Factors for base weight ``name`` (``scale`` default: the source adapter's for it)."""
        self._check_open()
        self._check_factors(name, A, B)
        check_finite(A, f"{name} (LoRA A)", f"output {self.out}")
        check_finite(B, f"{name} (LoRA B)", f"output {self.out}")
        r = A.shape[0]
        entry = self.source.lora_entry(name)
        cfg = self.source.adapter_config
        if scale is None:
            rslora = bool(cfg.get("use_rslora"))
            scale = entry.scale if entry else lora_scale(cfg.get("lora_alpha", 8), r, rslora)
        embedding = entry.embedding if entry else is_embedding(name)
        if embedding or cfg.get("fan_in_fan_out"):
            A, B = B.T, A.T
        suffix = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        module = name.removesuffix(".weight")
        key = f"{PEFT_PREFIX}{module}."
        self._tensors[key + suffix[0]] = owned(A)
        self._tensors[key + suffix[1]] = owned(B)
        self._ranks[module] = (r, float(scale))

    def _adapter_config(self) -> dict:
        cfg = dict(self.source.adapter_config)
        ranks = {m: r for m, (r, _) in self._ranks.items()}
        rslora = bool(cfg.get("use_rslora"))
        alphas = _alphas(self._ranks, rslora)
        if rslora and (len(set(ranks.values())) > 1 or len(set(alphas.values())) > 1):
            # PEFT refuses rslora together with patterns: express each scale as alpha / r.
            cfg["use_rslora"] = rslora = False
            alphas = _alphas(self._ranks, rslora)
        r_common = Counter(ranks.values()).most_common(1)[0][0]
        alpha_common = Counter(alphas.values()).most_common(1)[0][0]
        cfg["r"] = r_common
        cfg["lora_alpha"] = alpha_common
        cfg["rank_pattern"] = {m: r for m, r in ranks.items() if r != r_common}
        cfg["alpha_pattern"] = {m: a for m, a in alphas.items() if a != alpha_common}
        source_modules = {n.removesuffix(".weight") for n in self.source.lora_targets()}
        if set(ranks) != source_modules:
            cfg["target_modules"] = sorted(ranks)
            cfg["layers_to_transform"] = None
            cfg["layers_pattern"] = None
            cfg["exclude_modules"] = None
        if self.base_model is not None:
            cfg["base_model_name_or_path"] = self.base_model
        return cfg

    def finish(self, card: ModelCard) -> Path:
        """Write adapter_model.safetensors, adapter_config.json, tokenizer, README.md; rename."""
        if not self._tensors:
            raise CheckpointError(f"no LoRA factors were added: {self.out}")
        return self._commit(self._write_files, card)

    def _write_files(self, card: ModelCard) -> None:
        self._check_space(sum(t.numel() * t.element_size() for t in self._tensors.values()))
        save_file(self._tensors, str(self.folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config = self._adapter_config()
        (self.folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if has_tokenizer(self.source.path):
            copy_files(self.source.path, self.folder, TOKENIZER_FILES)
        base = config.get("base_model_name_or_path") or str(self.source.base.path)
        (self.folder / "README.md").write_text(card.render(base), encoding="utf-8")
