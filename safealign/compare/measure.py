"""What one method cost: wall time, peak resident memory while it ran, weights it changed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from safealign.checkpoint import Checkpoint
from safealign.checkpoint.hub import is_adapter, resolve_checkpoint
from safealign.runtime import peak_rss_bytes

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except OSError:
        return peak_rss_bytes()


class Usage:
    """Context manager sampling resident memory every ``interval`` seconds in a thread.

    ``peak_bytes`` is the highest sample (the process's own peak, not a difference: what a
    machine must have to run the method in this process); ``seconds`` the wall time.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_bytes = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Usage:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())
        self.seconds = time.perf_counter() - self._start


def open_output(folder: str | Path, aligned: str | Path) -> Checkpoint:
    """A model folder, or an adapter folder on ``aligned``."""
    folder = resolve_checkpoint(folder)
    base = aligned if is_adapter(folder) else None
    return Checkpoint.open(folder, base=base)


def changed_share(output: str | Path, finetuned: str | Path, aligned: str | Path) -> float:
    """Share of the fine-tuned model's weight elements whose value the output changed,
    compared tensor by tensor (effective weights for adapters), one tensor in memory at a time."""
    changed = total = 0
    with open_output(output, aligned) as out, open_output(finetuned, aligned) as b:
        for name in b.names():
            if name not in out:
                continue
            before = b.get(name, torch.float32)
            after = out.get(name, torch.float32)
            changed += int((before != after).sum())
            total += before.numel()
    return changed / total if total else 0.0
