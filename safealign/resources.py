"""What a run needs of the machine, estimated from checkpoint headers, and whether it has it.

A clear refusal before loading beats an out-of-memory kill or a full disk halfway: an
:class:`Estimate` counts the bytes of the tensors a run holds (working copies included) and
writes; :func:`check_disk` and :func:`check_memory` refuse with a :class:`ResourceError`
when the machine plainly lacks them (free disk from :func:`shutil.disk_usage`, available
memory from psutil when installed, else ``/proc/meminfo``'s MemAvailable; unknown: no check).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

#: Slack for what the estimate leaves out (activations, the interpreter, libraries).
MEMORY_MARGIN = 1.2
#: Where Linux tells the memory available without swapping.
MEMINFO = Path("/proc/meminfo")


class ResourceError(ValueError):
    """The machine plainly lacks the memory or disk a run needs."""


class HasTensors(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...


def tensor_bytes(
    ckpt: HasTensors, dtype: torch.dtype | None = None, names: Iterable[str] = ()
) -> int:
    """Bytes of a checkpoint's tensors (``names``, default all) as stored, or in ``dtype``."""
    total = 0
    for name in names or ckpt.names():
        size = (dtype or ckpt.dtype(name)).itemsize
        total += math.prod(ckpt.shape(name)) * size
    return total


def format_bytes(count: int | None) -> str:
    """``1.2 GB``-style (decimal units); ``unknown`` for ``None``."""
    if count is None:
        return "unknown"
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def free_disk(path: str | Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``None``: cannot tell here)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_disk(path: str | Path, needed: int, what: str = "the output") -> None:
    """Refuse when the disk holding ``path`` has fewer than ``needed`` free bytes."""
    free = free_disk(path)
    if needed > free:
        raise ResourceError(
            f"not enough disk space for {what}: needs ~{format_bytes(needed)}, "
            f"{format_bytes(free)} free: {path}"
        )


def check_memory(needed: int, what: str = "this run") -> None:
    """Refuse when available memory is known and below ``needed`` bytes."""
    available = available_memory()
    if available is not None and needed > available:
        raise ResourceError(
            f"not enough memory for {what}: needs ~{format_bytes(needed)}, "
            f"{format_bytes(available)} available (use a smaller dtype or another machine)"
        )


@dataclass(frozen=True)
class Estimate:
    """Memory a run holds at its peak and disk it writes, in bytes."""

    memory: int
    disk: int
    out: Path | None = None

    def describe(self) -> str:
        """One line for a plan: needs vs what the machine has."""
        memory = (
            f"memory ~{format_bytes(self.memory)} ({format_bytes(available_memory())} available)"
        )
        if self.out is None:
            return f"{memory}, disk ~{format_bytes(self.disk)}"
        free = format_bytes(free_disk(self.out))
        return f"{memory}, disk ~{format_bytes(self.disk)} ({free} free at {self.out.parent})"

    def at(self, out: str | Path) -> Estimate:
        """The same needs, the output going to ``out`` (its disk is then checked too)."""
        return Estimate(self.memory, self.disk, Path(out).expanduser().absolute())

    def check(self, what: str) -> None:
        """Refuse when the machine plainly lacks the memory or (with ``out``) the disk."""
        check_memory(self.memory, what)
        if self.out is not None:
            check_disk(self.out, self.disk, what)


#: Python, torch and transformers themselves (recover's plan measured ~600 MiB on CPU).
RUNTIME_BYTES = 600 * 2**20


def streaming_estimate(
    inputs: list[HasTensors], written: int, out: str | Path | None = None
) -> Estimate:
    """A run that streams tensor by tensor (a merge): per output tensor, every input's copy in
    fp32 plus the fp32 result and its stored copy; the output bytes written."""
    largest = max(
        (math.prod(ckpt.shape(name)) for ckpt in inputs for name in ckpt.names()), default=0
    )
    held = largest * 4 * (len(inputs) + 2)
    return Estimate(
        int(held * MEMORY_MARGIN) + RUNTIME_BYTES,
        written,
        Path(out).expanduser().absolute() if out else None,
    )
