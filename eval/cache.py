"""Model fingerprints and the on-disk response cache.

A response is cached under (model fingerprint, prompt, decoding settings), so evaluating the
same model again costs no generation. A fingerprint is the SHA-256 of a model folder's files
(and its adapter's; a hub id's folder is its snapshot in the hub cache): every file's name,
size and content hash, the content hashes memoised by (path, size, mtime) so a large
checkpoint is read once. In-memory models have no fingerprint and are not cached unless the
caller supplies one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from safealign import paths
from safealign.checkpoint.hub import resolve_checkpoint


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path, memo: dict) -> str:
    """SHA-256 of a file's content, memoised by (path, size, mtime_ns)."""
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo_key not in memo:
        with open(path, "rb") as handle:
            memo[memo_key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return memo[memo_key]


def folder_fingerprint(*folders: str | Path | None, cache_dir: str | Path | None = None) -> str:
    """Fingerprint of model folders or hub ids (e.g. a base model and an adapter); README files
    ignored."""
    memo_path = Path(cache_dir or paths.cache_dir()) / "file_digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    before = len(memo)
    entries = []
    for folder in folders:
        if folder is None:
            continue
        folder = resolve_checkpoint(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a model folder")
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() != ".md":
                entries.append([path.name, path.stat().st_size, file_digest(path, memo)])
        entries.append("|")
    if len(memo) != before:
        memo = {k: v for k, v in memo.items() if Path(k.split("|", 1)[0]).exists()}
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return _key(entries)


class ResponseCache:
    """SQLite store of responses keyed on (fingerprint, prompt, decoding settings)."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.path = Path(cache_dir or paths.cache_dir()) / "responses.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:
                yield db
        finally:
            db.close()

    @staticmethod
    def keys(fingerprint: str, prompts: Iterable[str], decoding: dict) -> list[str]:
        return [_key(fingerprint, prompt, decoding) for prompt in prompts]

    def get(self, keys: Sequence[str]) -> dict[str, str]:
        """Cached responses for the keys that have one."""
        found: dict[str, str] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT key, response FROM responses WHERE key IN ({marks})", chunk
                )
                found.update(rows)
        return found

    def put(self, items: dict[str, str]) -> None:
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?)", items.items())
