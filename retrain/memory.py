"""Peak memory of the training loop: CUDA allocator peak, or the process's RSS high-water mark
(reset at the start through /proc/self/clear_refs on Linux) above the RSS at that moment."""

from __future__ import annotations

from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """``start()`` then ``bytes()``: the peak above the start (CUDA: allocated bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.base = (_status_kb("VmRSS") or 0) * 1024

    def bytes(self) -> int:
        """Peak bytes above the start (0 where the platform does not tell)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        peak = _status_kb("VmHWM")
        return max(0, peak * 1024 - self.base) if peak is not None else 0
