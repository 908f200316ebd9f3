"""A lazy tensor store: the headers of a set of weight files, tensors read on demand and
checked finite as they are read.

Safetensors files are the norm; pickle files (``.bin``) are read only inside
:func:`~safealign.checkpoint.files.allow_pickle`, with ``torch.load(weights_only=True,
mmap=True)`` (no code runs, no tensor is read until asked for).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from safealign.checkpoint.files import CheckpointError, pickle_allowed
from safealign.checkpoint.header import TensorInfo, read_safetensors_header


def check_finite(tensor: torch.Tensor, name: str, where: Path | str) -> None:
    """Refuse a floating-point tensor holding NaN or Inf, naming it and ``where`` it is from.

    One sum first (NaN and Inf propagate through it); only when that is not finite (or the
    sum overflowed) the exact element check runs, to tell which.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if torch.isfinite(tensor.sum()):
        return
    bad = ~torch.isfinite(tensor)
    if not bad.any():
        return  # the sum overflowed; every element is finite
    first = int(bad.reshape(-1).nonzero()[0])
    kind = "NaN" if torch.isnan(tensor.reshape(-1)[first]) else "Inf"
    count = int(bad.sum())
    raise CheckpointError(
        f"tensor {name} holds {count} non-finite values ({kind} at flat index {first}): {where}"
    )


def check_finite_model(model: torch.nn.Module, where: Path | str) -> None:
    """:func:`check_finite` on every parameter and buffer of a loaded model."""
    for name, tensor in model.state_dict().items():
        check_finite(tensor, name, where)


def _pickle_state(file: Path) -> Mapping[str, torch.Tensor]:
    """A pickle weights file's tensors, memory-mapped (``weights_only``: no code runs)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"cannot read pickle weights (they hold code or objects other than tensors): {file}"
        ) from None
    except (RuntimeError, OSError, ValueError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read pickle weights ({first}): {file}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"pickle weights are not a name -> tensor mapping: {file}")
    return state


class TensorStore:
    """Tensor infos of a set of weight files, with one lazily opened handle per file."""

    def __init__(self, files: Iterable[Path]):
        self.files = list(files)
        self.infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for file in self.files:
            for name, info in self._header(file).items():
                if name in self.infos:
                    raise CheckpointError(f"tensor {name} stored twice: {file}")
                self.infos[name] = info

    def _header(self, file: Path) -> dict[str, TensorInfo]:
        if file.suffix == ".safetensors":
            return read_safetensors_header(file)
        if not pickle_allowed():
            raise CheckpointError(f"pickle weights refused (pass --allow-pickle): {file}")
        state = self._handles[file] = _pickle_state(file)
        return {name: TensorInfo(file, t.dtype, tuple(t.shape)) for name, t in state.items()}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh copy of tensor ``name`` (cast to ``dtype`` when given), checked finite."""
        info = self.infos[name]
        handle = self._handles.get(info.file)
        if handle is None:
            if info.file.suffix != ".safetensors":
                handle = self._handles[info.file] = _pickle_state(info.file)
            else:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        tensor = handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
        # Tensors from one handle share a private mapping: hand out an independent copy, and
        # check that copy (its pages are in memory now; the check is one sum over it).
        if dtype is not None and dtype != tensor.dtype:
            tensor = tensor.to(dtype)
        else:
            tensor = tensor.clone()
        check_finite(tensor, name, info.file)
        return tensor

    def close(self) -> None:
        self._handles.clear()
