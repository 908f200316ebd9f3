"""Where things are on disk: the cache folder, and whether a folder holds a tokenizer."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SAFEALIGN_CACHE``, else ``$XDG_CACHE_HOME/safealign``, else ``~/.cache/safealign``."""
    if env := os.environ.get("SAFEALIGN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "safealign"


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a Hugging Face tokenizer."""
    folder = Path(folder)
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
