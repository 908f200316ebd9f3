"""LoRA adapters: the one low-rank type, the one scale rule, and PEFT key mapping.

A LoRA update of a weight is ``delta = scale * B @ A`` (:class:`LowRank`), oriented as the
*stored* base weight: for ``fan_in_fan_out`` layers and embeddings PEFT's factors are
transposed and swapped to fit it. :func:`map_adapter` matches an adapter's PEFT keys to the
base weights it changes; :func:`lora_scale` is the only place the scale is computed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from safealign.checkpoint.files import ADAPTER_CONFIG_NAME, CheckpointError
from safealign.checkpoint.header import TensorInfo

if TYPE_CHECKING:
    from safealign.checkpoint.reader import Checkpoint

PEFT_PREFIX = "base_model.model."
EMBEDDING_NAME = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.weight$")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$")


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ``delta = scale * B @ A`` with B: [out, r] and A: [r, in]."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """``scale * B @ A`` in fp32 (or in the factors' dtype when it is wider)."""
        dtype = torch.promote_types(self.B.dtype, torch.float32)
        return (self.B.to(dtype) @ self.A.to(dtype)).mul_(self.scale)

    def scaled(self, factor: float) -> LowRank:
        return LowRank(self.A, self.B, self.scale * factor)

    @staticmethod
    def concat(parts: list[LowRank]) -> LowRank:
        """Sum of updates as one update of the summed rank (scales folded into B)."""
        a = torch.cat([p.A for p in parts])
        b = torch.cat([p.scale * p.B for p in parts], dim=1)
        return LowRank(a, b, 1.0)


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """The LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (as PEFT)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_alpha(scale: float, r: int, rslora: bool) -> int | float:
    """The ``lora_alpha`` giving ``scale`` at rank ``r`` (inverse of :func:`lora_scale`)."""
    alpha = float(f"{scale * (math.sqrt(r) if rslora else r):.12g}")
    return int(alpha) if alpha.is_integer() else alpha


@dataclass(frozen=True)
class LoraEntry:
    """Where the factors of one base weight are stored, and how to read them."""

    a_key: str
    b_key: str
    scale: float
    transposed: bool  # True for fan_in_fan_out and embedding layers
    embedding: bool


@dataclass
class AdapterMap:
    """An adapter's tensors by base weight: LoRA factors, and full replacements."""

    lora: dict[str, LoraEntry] = field(default_factory=dict)
    #: base tensor name -> adapter key of a tensor stored in full (modules_to_save, embeddings)
    replaced: dict[str, str] = field(default_factory=dict)


def is_embedding(name: str) -> bool:
    """Whether base weight ``name`` is an input embedding (by its name)."""
    return bool(EMBEDDING_NAME.search(name))


def pattern_value(patterns: Mapping, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first key matching the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _group_keys(infos: Mapping[str, TensorInfo], base: Checkpoint, amap: AdapterMap, file: Path):
    """module -> (A key, B key, embedding); full tensors go to ``amap.replaced``."""
    modules: dict[str, tuple[str | None, str | None, bool]] = {}
    for key in sorted(infos):
        stripped = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(stripped)
        if match is None:
            full = stripped.replace(".base_layer.", ".")
            if full in base:
                amap.replaced[full] = key  # modules_to_save, or a saved (resized) embedding
                continue
            raise CheckpointError(f"adapter tensor {key} matches no base tensor: {file}")
        module, embedding = match["module"], bool(match["emb"])
        a_key, b_key, _ = modules.get(module, (None, None, embedding))
        if match["ab"] == "A":
            a_key = key
        else:
            b_key = key
        modules[module] = (a_key, b_key, embedding)
    return modules


def _entry(cfg: dict, module: str, keys: tuple, infos: Mapping, base: Checkpoint, file: Path):
    """The checked :class:`LoraEntry` of one module."""
    a_key, b_key, embedding = keys
    if a_key is None or b_key is None:
        raise CheckpointError(
            f"LoRA factor {'A' if a_key is None else 'B'} missing for {module}: {file}"
        )
    name = f"{module}.weight"
    if name not in base:
        raise CheckpointError(f"LoRA target {module} matches no base weight: {file}")
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    transposed = embedding or bool(cfg.get("fan_in_fan_out"))
    a_shape, b_shape = infos[a_key].shape, infos[b_key].shape
    out_in = base.shape(name)
    if len(out_in) != 2:
        raise CheckpointError(f"LoRA on a {len(out_in)}-d weight is not supported: {name}")
    if transposed:
        a_shape, b_shape = b_shape[::-1], a_shape[::-1]
    if a_shape[0] != r or b_shape != (out_in[0], r) or a_shape != (r, out_in[1]):
        raise CheckpointError(
            f"LoRA factors of {module} (A {list(a_shape)}, B {list(b_shape)}, r={r}) "
            f"do not fit base weight {list(out_in)}: {file}"
        )
    scale = lora_scale(alpha, r, bool(cfg.get("use_rslora")))
    return name, LoraEntry(a_key, b_key, scale, transposed, embedding)


def map_adapter(
    cfg: dict, infos: Mapping[str, TensorInfo], base: Checkpoint, file: Path
) -> AdapterMap:
    """Match an adapter's PEFT keys (``infos``, read from ``file``) to ``base``'s weights."""
    amap = AdapterMap()
    for module, keys in _group_keys(infos, base, amap, file).items():
        name, entry = _entry(cfg, module, keys, infos, base, file)
        amap.lora[name] = entry
    return amap


def read_factors(entry: LoraEntry, read, dtype: torch.dtype) -> LowRank:
    """The factors of ``entry`` in stored-weight orientation; ``read(key, dtype)`` reads."""
    a, b = read(entry.a_key, dtype), read(entry.b_key, dtype)
    if entry.transposed:
        a, b = b.T.contiguous(), a.T.contiguous()
    return LowRank(a, b, entry.scale)


# Options under which a saved LoRA's effect is not W + scale * B @ A (or not only that). PEFT
# marks its LoRA variants in LoraConfig field metadata; each one is refused, not approximated.
UNSUPPORTED_ADAPTER_OPTIONS = {
    "use_dora": "DoRA",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "lora_bias": "lora_bias",
    "target_parameters": "target_parameters (LoRA on bare parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QALoRA",
}
UNSUPPORTED_INIT = {"mica": "MiCA"}


def check_adapter_supported(cfg: dict, file: Path) -> None:
    """Refuse adapter types and LoRA variants whose effect is not ``W + scale * B @ A``."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"unsupported adapter type {peft_type} (only LoRA): {file}")
    for option, label in UNSUPPORTED_ADAPTER_OPTIONS.items():
        if cfg.get(option):
            raise CheckpointError(f"unsupported LoRA variant {label}: {file}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in UNSUPPORTED_INIT:
        raise CheckpointError(f"unsupported LoRA variant {UNSUPPORTED_INIT[init.lower()]}: {file}")


def adapter_base_path(cfg: dict, folder: Path) -> Path:
    """The adapter's ``base_model_name_or_path`` as a local folder, else an error."""
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(
            f"adapter names no base_model_name_or_path, pass base=: {folder / ADAPTER_CONFIG_NAME}"
        )
    for candidate in (Path(base).expanduser(), folder / base):
        if candidate.is_dir():
            return candidate.resolve()
    raise CheckpointError(
        f"adapter base {base!r} is not a local folder, pass base=: {folder / ADAPTER_CONFIG_NAME}"
    )
