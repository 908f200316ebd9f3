"""A hand-made Hugging Face hub cache for offline tests: models stored as the hub stores them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_of(name: str) -> str:
    """A stable fake commit hash for ``name``."""
    return hashlib.sha1(name.encode()).hexdigest()


def add_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
    """Store ``folder`` as ``repo_id`` at ``commit`` (named by ``refs``); return the snapshot."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot
