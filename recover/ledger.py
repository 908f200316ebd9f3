"""What each step restored and rolled back, so steps can be undone from the fine-tuned file."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _compact(index: torch.Tensor) -> torch.Tensor:
    """Flat indices stored as int32 when they fit (they are per tensor)."""
    index = index.cpu()
    if index.numel() and int(index.max()) < 2**31:
        return index.to(torch.int32)
    return index


class Ledger:
    """Flat indices restored and rolled back, per step and tensor.

    Values are not kept: undoing reads the fine-tuned values back from disk, one tensor at
    a time. Elements once rolled back are ``blocked``: never restored again.
    """

    def __init__(self) -> None:
        self.restored: dict[int, dict[str, torch.Tensor]] = {}
        self.rolled_back: dict[int, dict[str, torch.Tensor]] = {}
        self._blocked: dict[str, torch.Tensor] = {}

    def record_restore(self, step: int, picked: dict[str, torch.Tensor]) -> None:
        self.restored[step] = {name: _compact(idx) for name, idx in picked.items()}

    def record_rollback(self, step: int, picked: dict[str, torch.Tensor]) -> None:
        self.rolled_back[step] = {name: _compact(idx) for name, idx in picked.items()}
        for name, idx in picked.items():
            old = self._blocked.get(name)
            merged = idx.cpu().long() if old is None else torch.cat([old, idx.cpu().long()])
            self._blocked[name] = merged.unique(sorted=True)

    def blocked(self, name: str) -> torch.Tensor | None:
        """Sorted flat indices of ``name`` that were rolled back at some step."""
        return self._blocked.get(name)

    def net_total(self, upto: int) -> int:
        """Elements holding aligned values after step ``upto``."""
        restored = sum(
            i.numel() for s in range(1, upto + 1) for i in self.restored.get(s, {}).values()
        )
        rolled = sum(
            i.numel() for s in range(1, upto + 1) for i in self.rolled_back.get(s, {}).values()
        )
        return restored - rolled

    def take(self, steps: Iterable[int]) -> dict[str, torch.Tensor]:
        """Forget ``steps``; return every element they restored, as flat indices per tensor
        (elements rolled back since are included: they already hold fine-tuned values)."""
        by_name: dict[str, list[torch.Tensor]] = {}
        for step in steps:
            for name, idx in self.restored.pop(step, {}).items():
                by_name.setdefault(name, []).append(idx.long())
            self.rolled_back.pop(step, None)
        return {name: torch.cat(parts) for name, parts in by_name.items()}
