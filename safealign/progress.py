"""The one progress callback every capability takes: ``capability(inputs, settings, out,
progress)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

#: Called with one status line at a time; ``None`` is silent (no lines, no bars).
ProgressCallback: TypeAlias = Callable[[str], None] | None


def say(progress: ProgressCallback, line: str) -> None:
    """Hand ``line`` to ``progress``, unless it is ``None``."""
    if progress is not None:
        progress(line)
