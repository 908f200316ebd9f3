"""A lazy tensor store: the headers of a set of safetensors files, tensors read on demand."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from safealign.checkpoint.files import CheckpointError
from safealign.checkpoint.header import TensorInfo, read_safetensors_header


class TensorStore:
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
        """A fresh copy of tensor ``name`` (cast to ``dtype`` when given)."""
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
