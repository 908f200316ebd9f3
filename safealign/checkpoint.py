"""Checkpoints on disk: read tensors lazily by name, validate, write sharded and atomically.

A :class:`Checkpoint` is a Hugging Face model folder (``config.json`` plus one or more
safetensors files) or a PEFT LoRA adapter folder on such a base. Tensor names, shapes and
dtypes come from the safetensors headers alone; a tensor is read only when asked for. For an
adapter, a target module's weight is the effective ``W + scale * B @ A``, computed in fp32.

:class:`CheckpointWriter` and :class:`AdapterWriter` write into a temporary folder beside the
destination and rename it into place only when the write finished; an exception leaves the
destination untouched.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Self

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safealign.paths import has_tokenizer

__all__ = [
    "AdapterWriter",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "LoraFactors",
    "ModelCard",
    "check_finite",
    "parse_size",
    "validate_checkpoints",
]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "additional_chat_templates",
)
MODEL_FILES = ("config.json", "generation_config.json")

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says what and where, one line each."""


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one stored tensor."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LoraFactors:
    """LoRA factors of one base weight, oriented so that ``delta = scale * B @ A``.

    The orientation is that of the *stored* base weight: for ``fan_in_fan_out`` layers and
    embeddings, PEFT's factors are transposed and swapped to fit it.
    """

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` in fp32."""
        return (self.B.float() @ self.A.float()).mul_(self.scale)


@dataclass(frozen=True)
class _LoraEntry:
    a_key: str
    b_key: str
    scale: float
    transposed: bool  # True for fan_in_fan_out and embedding layers
    embedding: bool


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than 8 bytes")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > 100_000_000:
                raise ValueError(f"header length {length} exceeds file size {size}")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise CheckpointError(f"cannot read safetensors file ({err.strerror}): {file}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt safetensors header ({err}): {file}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header (not a JSON object): {file}")
    data_size = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            code = entry.get("dtype") if isinstance(entry, dict) else None
            raise CheckpointError(f"corrupt safetensors header (dtype {code!r} of {name}): {file}")
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"corrupt safetensors header (bad entry {name}): {file}"
            ) from None
        if not 0 <= start <= end <= data_size:
            raise CheckpointError(
                f"corrupt safetensors header ({name} lies outside the file, truncated?): {file}"
            )
        infos[name] = TensorInfo(file, dtype, shape)
    return infos


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing {file.name}: {file.parent}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"invalid JSON ({err}): {file}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"invalid JSON (expected an object): {file}")
    return data


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from the index when there is one."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"index has no weight_map: {index}")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"missing shard listed in {index.name}: {file}")
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    _no_safetensors(folder)


def _no_safetensors(folder: Path, expected: str = "*.safetensors") -> NoReturn:
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"pickle-only checkpoint, safetensors required (convert it first): {pickles[0]}"
        )
    raise CheckpointError(f"no safetensors weights ({expected}): {folder}")


class _TensorStore:
    """Tensor infos of a set of safetensors files, with one lazily opened handle per file."""

    def __init__(self, files: Iterable[Path]):
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_safetensors_header(file).items():
                if name in self.infos:
                    raise CheckpointError(f"tensor {name} stored twice: {file}")
                self.infos[name] = info
        self._handles: dict[Path, object] = {}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        info = self.infos[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        tensor = handle.get_tensor(name)
        # Tensors from one handle share a private mapping: hand out an independent copy.
        if dtype is not None and dtype != tensor.dtype:
            return tensor.to(dtype)
        return tensor.clone()

    def close(self) -> None:
        self._handles.clear()


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


class Checkpoint:
    """An HF model folder, or a PEFT LoRA adapter folder on a base model folder."""

    def __init__(
        self,
        path: Path,
        config: dict,
        store: _TensorStore,
        *,
        base: Checkpoint | None = None,
        adapter_config: dict | None = None,
    ):
        self.path = path
        self.config = config
        self.base = base
        self.adapter_config = adapter_config
        self._store = store
        self._lora: dict[str, _LoraEntry] = {}
        self._replaced: dict[str, str] = {}
        if adapter_config is not None:
            self._map_adapter()

    # -- opening

    @classmethod
    def open(
        cls, path: str | Path | Checkpoint, base: str | Path | Checkpoint | None = None
    ) -> Checkpoint:
        """Open a model folder, or an adapter folder (``base``: its model folder, default:
        the adapter's ``base_model_name_or_path`` if that is a local folder)."""
        if isinstance(path, Checkpoint):
            return path
        folder = _resolve(path)
        if not folder.exists():
            raise CheckpointError(f"checkpoint not found: {folder}")
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint is not a folder: {folder}")
        if (folder / ADAPTER_CONFIG_NAME).exists():
            return cls._open_adapter(folder, base)
        if base is not None:
            raise CheckpointError(
                f"base given, but not an adapter (no {ADAPTER_CONFIG_NAME}): {folder}"
            )
        config = _read_json(folder / "config.json")
        return cls(folder, config, _TensorStore(_weight_files(folder)))

    @classmethod
    def _open_adapter(cls, folder: Path, base: str | Path | Checkpoint | None) -> Checkpoint:
        adapter_config = _read_json(folder / ADAPTER_CONFIG_NAME)
        _check_adapter_supported(adapter_config, folder / ADAPTER_CONFIG_NAME)
        weights = folder / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            _no_safetensors(folder, ADAPTER_WEIGHTS_NAME)
        if base is None:
            base = _adapter_base_path(adapter_config, folder)
        base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
        if base_ckpt.is_adapter:
            raise CheckpointError(f"an adapter's base must be a model folder: {base_ckpt.path}")
        return cls(
            folder,
            base_ckpt.config,
            _TensorStore([weights]),
            base=base_ckpt,
            adapter_config=adapter_config,
        )

    def _map_adapter(self) -> None:
        """Match the adapter's PEFT keys to base weight names."""
        cfg = self.adapter_config
        keys = set(self._store.infos)
        file = self.path / ADAPTER_WEIGHTS_NAME
        pattern = re.compile(
            r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.weight)?$"
        )
        modules: dict[str, tuple[str, str, bool]] = {}
        for key in sorted(keys):
            stripped = key.removeprefix(PEFT_PREFIX)
            match = pattern.match(stripped)
            if match is None:
                full = stripped.replace(".base_layer.", ".")
                if full in self.base:
                    self._replaced[full] = key  # modules_to_save, or a saved (resized) embedding
                    continue
                raise CheckpointError(f"adapter tensor {key} matches no base tensor: {file}")
            module, embedding = match["module"], bool(match["emb"])
            a_key, b_key, _ = modules.get(module, (None, None, embedding))
            if match["ab"] == "A":
                a_key = key
            else:
                b_key = key
            modules[module] = (a_key, b_key, embedding)
        for module, (a_key, b_key, embedding) in modules.items():
            if a_key is None or b_key is None:
                raise CheckpointError(
                    f"LoRA factor {'A' if a_key is None else 'B'} missing for {module}: {file}"
                )
            name = f"{module}.weight"
            if name not in self.base:
                raise CheckpointError(f"LoRA target {module} matches no base weight: {file}")
            r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            transposed = embedding or bool(cfg.get("fan_in_fan_out"))
            a_shape, b_shape = self._store.infos[a_key].shape, self._store.infos[b_key].shape
            out_in = self.shape(name)
            if len(out_in) != 2:
                raise CheckpointError(f"LoRA on a {len(out_in)}-d weight is not supported: {name}")
            if transposed:
                a_shape, b_shape = b_shape[::-1], a_shape[::-1]
            if a_shape[0] != r or b_shape != (out_in[0], r) or a_shape != (r, out_in[1]):
                raise CheckpointError(
                    f"LoRA factors of {module} (A {list(a_shape)}, B {list(b_shape)}, r={r}) "
                    f"do not fit base weight {list(out_in)}: {file}"
                )
            self._lora[name] = _LoraEntry(a_key, b_key, scale, transposed, embedding)

    # -- properties

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def vocab_size(self) -> int | None:
        text = self.config.get("text_config") or {}
        return self.config.get("vocab_size", text.get("vocab_size"))

    @property
    def tie_word_embeddings(self) -> bool:
        text = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))

    @property
    def model_folder(self) -> Path:
        """The folder holding config.json: the base's for an adapter."""
        return self.base.path if self.base is not None else self.path

    @property
    def tokenizer_folder(self) -> Path:
        """Where the tokenizer lives: the adapter's own if it has one, else the model's."""
        if self.is_adapter and has_tokenizer(self.path):
            return self.path
        return self.model_folder

    # -- tensors

    def names(self) -> list[str]:
        """Full-model tensor names as stored (tied weights absent from the files are not listed)."""
        if self.base is not None:
            return self.base.names()
        return list(self._store.infos)

    def __contains__(self, name: object) -> bool:
        if self.base is not None:
            return name in self.base
        return name in self._store.infos

    def __len__(self) -> int:
        return len(self.names())

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._store.infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self.base is not None:
            if name in self._replaced:
                return self._store.infos[self._replaced[name]].shape
            return self.base.shape(name)
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        if self.base is not None:
            if name in self._replaced:
                return self._store.infos[self._replaced[name]].dtype
            return self.base.dtype(name)
        return self._info(name).dtype

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh copy). For an adapter target: ``W + scale * B @ A`` in fp32,
        then cast to ``dtype`` (default: the base weight's dtype)."""
        if self.base is None:
            self._info(name)
            return self._store.get(name, dtype)
        factors = self.lora_factors(name)
        stored = self.dtype(name)
        if factors is None:
            return self._stored(name, dtype)
        weight = self._stored(name, torch.float32)
        weight.addmm_(factors.B, factors.A, alpha=factors.scale)
        return weight.to(dtype or stored)

    def _stored(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """An adapter's stored version of a base tensor: its own full copy, else the base's."""
        if name in self._replaced:
            return self._store.get(self._replaced[name], dtype)
        return self.base.get(name, dtype)

    def lora_factors(self, name: str, dtype: torch.dtype = torch.float32) -> LoraFactors | None:
        """LoRA factors for base weight ``name`` (``None`` if the adapter leaves it alone)."""
        entry = self._lora.get(name)
        if entry is None:
            if name not in self:
                raise KeyError(f"no tensor {name!r} in {self.path}")
            return None
        a = self._store.get(entry.a_key, dtype)
        b = self._store.get(entry.b_key, dtype)
        if entry.transposed:
            a, b = b.T.contiguous(), a.T.contiguous()
        return LoraFactors(a, b, entry.scale)

    def lora_scale(self, name: str) -> float | None:
        """The LoRA scale of base weight ``name`` (``None`` if the adapter leaves it alone)."""
        entry = self._lora.get(name)
        return entry.scale if entry is not None else None

    def lora_targets(self) -> list[str]:
        """Base weight names the adapter's LoRA factors modify."""
        return list(self._lora)

    def replaced_names(self) -> list[str]:
        """Base tensors an adapter stores in full (``modules_to_save``, saved embeddings)."""
        return list(self._replaced)

    def num_parameters(self) -> int:
        return sum(math.prod(self.shape(n)) for n in self.names())

    def nbytes(self) -> int:
        return sum(math.prod(self.shape(n)) * self.dtype(n).itemsize for n in self.names())

    def close(self) -> None:
        """Release the open file handles (they reopen on demand)."""
        self._store.close()
        if self.base is not None:
            self.base.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = f"adapter on {self.base.path}" if self.base is not None else "model"
        return f"Checkpoint({str(self.path)!r}, {kind}, {len(self)} tensors)"


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first key matching the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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


def _check_adapter_supported(cfg: dict, file: Path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"unsupported adapter type {peft_type} (only LoRA): {file}")
    for option, label in UNSUPPORTED_ADAPTER_OPTIONS.items():
        if cfg.get(option):
            raise CheckpointError(f"unsupported LoRA variant {label}: {file}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in UNSUPPORTED_INIT:
        raise CheckpointError(f"unsupported LoRA variant {UNSUPPORTED_INIT[init.lower()]}: {file}")


def _adapter_base_path(cfg: dict, folder: Path) -> Path:
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


# ----------------------------------------------------------------------------- validation


def _brief(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _family(ckpt: Checkpoint) -> str:
    archs = "/".join(ckpt.architectures) or "no architectures"
    return f"{ckpt.model_type} ({archs})"


def validate_checkpoints(
    *ckpts: Checkpoint | str | Path, names: Iterable[str] | None = None
) -> None:
    """Check that checkpoints can be combined tensor by tensor; headers only.

    Every checkpoint is compared with the first: architecture family, vocabulary size, tensor
    names (or only ``names`` when given) and shapes. Raises :class:`CheckpointError` with one
    line per problem.
    """
    opened = [Checkpoint.open(c) for c in ckpts]
    if len(opened) < 2:
        return
    first, problems = opened[0], []
    wanted = list(names) if names is not None else None
    if wanted is not None:
        for ckpt in opened:
            missing = [n for n in wanted if n not in ckpt]
            if missing:
                problems.append(f"{len(missing)} tensors missing ({_brief(missing)}): {ckpt.path}")
    for other in opened[1:]:
        where = f"{first.path} vs {other.path}"
        if (first.model_type, first.architectures) != (other.model_type, other.architectures):
            problems.append(f"architecture differs, {_family(first)} vs {_family(other)}: {where}")
        if first.vocab_size != other.vocab_size:
            problems.append(
                f"vocab_size differs, {first.vocab_size} vs {other.vocab_size}: {where}"
            )
        a_names, b_names = first.names(), other.names()
        if wanted is None:
            b_set, a_set = set(b_names), set(a_names)
            only_a = [n for n in a_names if n not in b_set]
            only_b = [n for n in b_names if n not in a_set]
            if only_a or only_b:
                problems.append(
                    f"tensor names differ, {len(only_a)} only in first ({_brief(only_a)}), "
                    f"{len(only_b)} only in second ({_brief(only_b)}): {where}"
                )
            common = [n for n in a_names if n in b_set]
        else:
            common = [n for n in wanted if n in first and n in other]
        shapes = [
            f"{n} {list(first.shape(n))} vs {list(other.shape(n))}"
            for n in common
            if first.shape(n) != other.shape(n)
        ]
        if shapes:
            problems.append(f"{len(shapes)} shapes differ ({_brief(shapes)}): {where}")
    if problems:
        raise CheckpointError("\n".join(problems))


def check_finite(ckpt: Checkpoint | str | Path, names: Iterable[str] | None = None) -> None:
    """Stream tensors (all, or ``names``) and raise if any holds NaN or inf."""
    ckpt = Checkpoint.open(ckpt)
    bad = []
    for name in names if names is not None else ckpt.names():
        if not ckpt.dtype(name).is_floating_point:
            continue
        tensor = ckpt.get(name)
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            bad.append(f"{name} ({nan} NaN, {inf} inf)")
        del tensor
    if bad:
        raise CheckpointError(f"{len(bad)} tensors not finite ({_brief(bad)}): {ckpt.path}")


# ----------------------------------------------------------------------------- writing

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1.5GiB`` or an int (decimal units, like HF)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match[2] not in SIZE_UNITS:
            raise ValueError(f"bad size {size!r}: use bytes or e.g. 500MB, 5GB, 2GiB")
        value = int(float(match[1]) * SIZE_UNITS[match[2]])
    if value <= 0:
        raise ValueError(f"bad size {size!r}: must be positive")
    return value


@dataclass
class ModelCard:
    """What produced a checkpoint; rendered as its README.md."""

    title: str
    method: str
    summary: str
    settings: dict = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    results: dict | None = None
    base_model: str | None = None

    def render(self, base_model: str | None = None) -> str:
        from safealign import __version__

        base = self.base_model or base_model
        lines = ["---", "library_name: transformers", "tags:", "- safealign"]
        lines.append(f"- {_yaml_scalar(self.method)}")
        if base:
            lines.append(f"base_model: {_yaml_scalar(base)}")
        lines += ["---", "", f"# {self.title}", "", self.summary.strip(), ""]
        lines.append(f"Produced by safealign {__version__} with method `{self.method}`.")
        if self.settings:
            lines += ["", "## Settings", "", "| setting | value |", "| --- | --- |"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in self.settings.items()]
        if self.inputs:
            lines += ["", "## Inputs", "", "| role | checkpoint |", "| --- | --- |"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in self.inputs.items()]
        if self.results:
            lines += ["", "## Results", ""] + _results_table(self.results)
        return "\n".join(lines) + "\n"


def _yaml_scalar(value: str) -> str:
    return json.dumps(str(value))


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _cell(value) if value is not None else "-"


def _results_table(results: dict) -> list[str]:
    """Rows of dicts -> one table with a column per key; flat dict -> metric | value."""
    if all(isinstance(v, dict) for v in results.values()):
        columns = list(dict.fromkeys(k for row in results.values() for k in row))
        lines = ["| | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
        for label, row in results.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        return lines
    lines = ["| metric | value |", "| --- | --- |"]
    return lines + [f"| {k} | {_fmt(v)} |" for k, v in results.items()]


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


class _AtomicFolder:
    """A temporary folder beside ``out`` that replaces ``out`` only on commit."""

    def __init__(self, out: str | Path, inputs: Iterable[Checkpoint | str | Path], overwrite: bool):
        self.out = _resolve(out)
        for item in inputs:
            for folder in _input_folders(item):
                if _is_within(self.out, folder):
                    raise CheckpointError(f"output would overwrite an input checkpoint: {self.out}")
                if overwrite and _is_within(folder, self.out):
                    raise CheckpointError(f"output folder contains an input checkpoint: {self.out}")
        if self.out.exists():
            if not self.out.is_dir():
                raise CheckpointError(f"output exists and is not a folder: {self.out}")
            if any(self.out.iterdir()) and not overwrite:
                raise CheckpointError(f"output folder not empty (use overwrite): {self.out}")
        self._folder = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.done = False

    @property
    def folder(self) -> Path:
        """The temporary folder, created on first use."""
        if not self._folder.exists() and not self.done:
            self._folder.mkdir(parents=True)
        return self._folder

    def commit(self) -> Path:
        """Move the temporary folder to ``out``; an existing ``out`` is replaced only now."""
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            self.out.rename(old)
        try:
            self.folder.rename(self.out)
        except BaseException:
            if old is not None:
                old.rename(self.out)
            raise
        self.done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        if not self.done:
            shutil.rmtree(self._folder, ignore_errors=True)
            self.done = True


def _input_folders(item: Checkpoint | str | Path) -> list[Path]:
    if isinstance(item, Checkpoint):
        folders = [item.path]
        if item.base is not None:
            folders.append(item.base.path)
        return folders
    return [_resolve(item)]


def _copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    """Copy the named files (or folders) that exist in ``src`` and not yet in ``dst``."""
    for name in names:
        if (dst / name).exists():
            continue
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
        elif (src / name).is_dir():
            shutil.copytree(src / name, dst / name)


def _source_checkpoint(source: Checkpoint | str | Path) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else Checkpoint.open(source)


def _base_model_name(source: Checkpoint) -> str:
    if source.is_adapter:
        return str(source.adapter_config.get("base_model_name_or_path") or source.base.path)
    return str(source.path)


class _FolderWriter:
    """What both writers share: files go to a temporary folder beside ``out`` (refused when
    ``out`` is an input, or not empty without ``overwrite``), renamed into place at the end.
    As a context manager, an exception inside (or a missing ``finish``) discards everything."""

    def __init__(self, out: str | Path, inputs: list[Checkpoint | str | Path], overwrite: bool):
        self._atomic = _AtomicFolder(out, inputs, overwrite)
        self.out = self._atomic.out

    @property
    def folder(self) -> Path:
        """The temporary folder being written (extra files such as report.json go here)."""
        return self._atomic.folder

    def _check_open(self) -> None:
        if self._atomic.done:
            raise CheckpointError(f"writer already finished or discarded: {self.out}")

    def _commit(self, write: Callable[[ModelCard], None], card: ModelCard) -> Path:
        """``write(card)`` the remaining files, then rename into place; discard on any error."""
        try:
            write(card)
            return self._atomic.commit()
        except BaseException:
            self._atomic.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary folder; the destination stays untouched."""
        self._atomic.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._atomic.done:
            self.discard()
            raise CheckpointError(f"writer closed without finish(), nothing written: {self.out}")


class CheckpointWriter(_FolderWriter):
    """Write a model folder as tensors arrive: shards flushed as they fill, atomic rename at
    :meth:`finish`. Use as a context manager; an exception inside discards everything."""

    def __init__(
        self,
        out: str | Path,
        *,
        source: Checkpoint | str | Path,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        inputs: Iterable[Checkpoint | str | Path] = (),
    ):
        self.source = _source_checkpoint(source)
        self.max_shard_size = parse_size(max_shard_size)
        super().__init__(out, [self.source, *inputs], overwrite)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._dtype_bytes: Counter[torch.dtype] = Counter()
        self.total_size = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a shard is written when the next tensor would overflow it.

        The writer keeps the tensor until its shard is written: do not modify it in place
        afterwards. Views and tensors sharing storage with a queued one are cloned.
        """
        self._check_open()
        if name in self._names:
            raise CheckpointError(f"tensor {name} added twice: {self.out}")
        tensor = _owned(tensor, self._pending.values())
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._names.add(name)
        self.total_size += size
        self.total_parameters += tensor.numel()
        if tensor.is_floating_point():
            self._dtype_bytes[tensor.dtype] += size

    def _flush(self) -> None:
        if not self._pending:
            return
        file = self.folder / f"shard-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._pending, str(file), metadata={"format": "pt"})
        self._shards.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, card: ModelCard) -> Path:
        """Write the last shard, index, config, tokenizer and README.md; rename into place."""
        if not self._names:
            raise CheckpointError(f"no tensors were added: {self.out}")
        return self._commit(self._write_files, card)

    def _write_files(self, card: ModelCard) -> None:
        self._flush()
        self._name_shards()
        self._write_config()
        _copy_files(self.source.tokenizer_folder, self.folder, TOKENIZER_FILES)
        (self.folder / "README.md").write_text(
            card.render(_base_model_name(self.source)), encoding="utf-8"
        )

    def _name_shards(self) -> None:
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self.folder / WEIGHTS_NAME)
            return
        weight_map = {}
        for i, (file, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            file.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        metadata = {"total_parameters": self.total_parameters, "total_size": self.total_size}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _write_config(self) -> None:
        """Copy config.json (dtype updated to what was written) and generation_config.json."""
        config = dict(self.source.config)
        if self._dtype_bytes:
            written = self._dtype_bytes.most_common(1)[0][0]
            config["dtype"] = str(written).removeprefix("torch.")
            config.pop("torch_dtype", None)
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_files(self.source.model_folder, self.folder, ["generation_config.json"])


def _owned(tensor: torch.Tensor, pending: Iterable[torch.Tensor]) -> torch.Tensor:
    """A detached, contiguous CPU tensor that owns its storage (no views, no sharing)."""
    tensor = tensor.detach().to("cpu").contiguous()
    storage = tensor.untyped_storage()
    shared = storage.nbytes() != tensor.numel() * tensor.element_size() or any(
        p.untyped_storage().data_ptr() == storage.data_ptr() for p in pending
    )
    return tensor.clone() if shared else tensor


# ----------------------------------------------------------------------------- adapters out

EMBEDDING_NAME = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)\.weight$")


class AdapterWriter(_FolderWriter):
    """Write a PEFT LoRA adapter folder from per-weight factors, atomically.

    Factors are given in :class:`LoraFactors` orientation (``delta = scale * B @ A`` on the
    stored base weight). The adapter_config.json is the source adapter's, with ``r``,
    ``lora_alpha`` and per-module patterns set so that PEFT reproduces each scale exactly.
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
        self.source = _source_checkpoint(source)
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

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, scale: float | None = None) -> None:
        """Factors for base weight ``name`` (``scale`` default: the source adapter's for it)."""
        self._check_open()
        if name not in self.source.base:
            raise CheckpointError(
                f"{name} is not a weight of the base model: {self.source.base.path}"
            )
        if not name.endswith(".weight"):
            raise CheckpointError(f"LoRA targets weights, got {name}: {self.out}")
        if name.removesuffix(".weight") in self._ranks:
            raise CheckpointError(f"factors for {name} added twice: {self.out}")
        out_in = self.source.base.shape(name)
        r = A.shape[0]
        if (
            len(out_in) != 2
            or A.dim() != 2
            or B.dim() != 2
            or tuple(B.shape) != (out_in[0], r)
            or A.shape[1] != out_in[1]
        ):
            raise CheckpointError(
                f"factors A {list(A.shape)}, B {list(B.shape)} do not fit {name} {list(out_in)}: "
                f"{self.out}"
            )
        if scale is None:
            existing = self.source.lora_scale(name)
            scale = existing if existing is not None else self._default_scale(r)
        module = name.removesuffix(".weight")
        embedding = self._is_embedding(name)
        if embedding or self.source.adapter_config.get("fan_in_fan_out"):
            A, B = B.T, A.T
        suffix = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        key = f"{PEFT_PREFIX}{module}."
        self._tensors[key + suffix[0]] = _owned(A, ())
        self._tensors[key + suffix[1]] = _owned(B, ())
        self._ranks[module] = (r, float(scale))

    def _default_scale(self, r: int) -> float:
        cfg = self.source.adapter_config
        alpha = cfg.get("lora_alpha", 8)
        return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def _is_embedding(self, name: str) -> bool:
        entry = self.source._lora.get(name)
        if entry is not None:
            return entry.embedding
        return bool(EMBEDDING_NAME.search(name))

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
        save_file(self._tensors, str(self.folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config = self._adapter_config()
        (self.folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if has_tokenizer(self.source.path):
            _copy_files(self.source.path, self.folder, TOKENIZER_FILES)
        base = config.get("base_model_name_or_path") or str(self.source.base.path)
        (self.folder / "README.md").write_text(card.render(base), encoding="utf-8")


def _alphas(ranks: dict[str, tuple[int, float]], rslora: bool) -> dict[str, int | float]:
    """lora_alpha per module giving each module's scale (alpha / r, or alpha / sqrt(r))."""
    alphas = {}
    for module, (r, scale) in ranks.items():
        alpha = float(f"{scale * (math.sqrt(r) if rslora else r):.12g}")
        alphas[module] = int(alpha) if alpha.is_integer() else alpha
    return alphas
