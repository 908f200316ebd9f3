"""Checkpoints on disk: a model folder, or a PEFT LoRA adapter on one, read lazily by name.

Tensor names, shapes and dtypes come from the safetensors headers alone; a tensor is read
only when asked for. For an adapter, a target module's weight is the effective
``W + scale * B @ A``, computed in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safealign.checkpoint.files import (
    ADAPTER_CONFIG_NAME,
    CheckpointError,
    adapter_weights,
    read_json,
    resolve,
    weight_files,
)
from safealign.checkpoint.header import TensorInfo
from safealign.checkpoint.hub import HubError, hub_repo, is_adapter, is_hub_id, resolve_checkpoint
from safealign.checkpoint.lora import (
    AdapterMap,
    LoraEntry,
    LowRank,
    adapter_base_path,
    check_adapter_supported,
    map_adapter,
    read_factors,
)
from safealign.checkpoint.store import TensorStore
from safealign.paths import has_tokenizer


class Checkpoint:
    """An HF model folder, or a PEFT LoRA adapter folder on a base model folder."""

    def __init__(
        self,
        path: Path,
        config: dict,
        store: TensorStore,
        *,
        base: Checkpoint | None = None,
        adapter_config: dict | None = None,
    ):
        self.path = path
        #: ``org/name`` when opened by hub id (``path`` is then its snapshot in the hub cache)
        self.hub_repo: str | None = None
        self.config = config
        self.base = base
        self.adapter_config = adapter_config
        self._store = store
        self._adapter = AdapterMap()
        if adapter_config is not None:
            self._adapter = map_adapter(adapter_config, store.infos, base, store.files[0])

    # -- opening

    @classmethod
    def open(
        cls, path: str | Path | Checkpoint, base: str | Path | Checkpoint | None = None
    ) -> Checkpoint:
        """Open a model folder or hub id, or an adapter (``base``: its model, default: the
        adapter's ``base_model_name_or_path``, a local folder or a hub id)."""
        if isinstance(path, Checkpoint):
            return path
        folder = resolve(resolve_checkpoint(path))
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint is not a folder: {folder}")
        if is_adapter(folder):
            checkpoint = cls._open_adapter(folder, base)
        elif base is not None:
            raise CheckpointError(
                f"base given, but not an adapter (no {ADAPTER_CONFIG_NAME}): {folder}"
            )
        else:
            config = read_json(folder / "config.json")
            checkpoint = cls(folder, config, TensorStore(weight_files(folder)))
        checkpoint.hub_repo = hub_repo(path)
        return checkpoint

    @classmethod
    def _open_adapter(cls, folder: Path, base: str | Path | Checkpoint | None) -> Checkpoint:
        adapter_config = read_json(folder / ADAPTER_CONFIG_NAME)
        check_adapter_supported(adapter_config, folder / ADAPTER_CONFIG_NAME)
        weights = adapter_weights(folder)
        if base is None:
            base = _adapter_base(adapter_config, folder)
        base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
        if base_ckpt.is_adapter:
            raise CheckpointError(f"an adapter's base must be a model folder: {base_ckpt.path}")
        return cls(
            folder,
            base_ckpt.config,
            TensorStore([weights]),
            base=base_ckpt,
            adapter_config=adapter_config,
        )

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
    def name(self) -> str:
        """How reports and model cards name it: ``org/name@<commit>`` when opened by hub id,
        else its folder."""
        return f"{self.hub_repo}@{self.path.name}" if self.hub_repo else str(self.path)

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
        """Header entry of ``name``: the adapter's full copy, else the base's, else our own."""
        if self.base is not None and name not in self._adapter.replaced:
            return self.base._info(name)
        try:
            return self._store.infos[self._adapter.replaced.get(name, name)]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor (a fresh copy). For an adapter target: ``W + scale * B @ A`` in fp32,
        then cast to ``dtype`` (default: the base weight's dtype)."""
        if self.base is None:
            self._info(name)
            return self._store.get(name, dtype)
        factors = self.lora_factors(name)
        if factors is None:
            return self._stored(name, dtype)
        weight = self._stored(name, torch.float32)
        weight.addmm_(factors.B, factors.A, alpha=factors.scale)
        return weight.to(dtype or self.dtype(name))

    def _stored(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """An adapter's stored version of a base tensor: its own full copy, else the base's."""
        if name in self._adapter.replaced:
            return self._store.get(self._adapter.replaced[name], dtype)
        return self.base.get(name, dtype)

    def lora_entry(self, name: str) -> LoraEntry | None:
        """How the adapter stores factors for base weight ``name`` (``None``: it does not)."""
        return self._adapter.lora.get(name)

    def lora_factors(self, name: str, dtype: torch.dtype = torch.float32) -> LowRank | None:
        """LoRA factors for base weight ``name`` (``None`` if the adapter leaves it alone)."""
        entry = self.lora_entry(name)
        if entry is None:
            if name not in self:
                raise KeyError(f"no tensor {name!r} in {self.path}")
            return None
        return read_factors(entry, self._store.get, dtype)

    def lora_targets(self) -> list[str]:
        """Base weight names the adapter's LoRA factors modify."""
        return list(self._adapter.lora)

    def replaced_names(self) -> list[str]:
        """Base tensors an adapter stores in full (``modules_to_save``, saved embeddings)."""
        return list(self._adapter.replaced)

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


def _adapter_base(adapter_config: dict, folder: Path) -> Path | Checkpoint:
    """The adapter's ``base_model_name_or_path``: a local folder, else the hub id opened."""
    try:
        return adapter_base_path(adapter_config, folder)
    except CheckpointError as err:
        name = adapter_config.get("base_model_name_or_path")
        if not is_hub_id(name):
            raise
        try:
            return Checkpoint.open(name)  # by id, so that it is named by its id
        except HubError as hub_err:
            raise CheckpointError(f"{err}; on the hub: {hub_err.reason}") from None
