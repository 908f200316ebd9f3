"""Hub ids as checkpoints: ``org/name`` or ``org/name@revision`` resolved to a local snapshot.

A reference that exists on disk is a local folder and is used as it is. Otherwise one shaped
like a hub id is fetched with ``huggingface_hub.snapshot_download`` into the hub cache
(``HF_HUB_CACHE`` / ``HF_HOME``), honouring ``HF_HUB_OFFLINE`` (the cache only) and the token
in ``HF_TOKEN`` (or ``hf auth login``). Only what a checkpoint is read through is fetched: JSON
(config, index, adapter and tokenizer configs), tokenizer and chat-template files, then the
safetensors files the index (or the folder) names; never pickles. The revision is a branch, tag
or commit, after ``@`` as in mergekit, or the ``revision`` argument (a local folder has none).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from safealign.checkpoint.files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    TOKENIZER_FILES,
    WEIGHTS_INDEX_NAME,
    CheckpointError,
    read_json,
    resolve,
)

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
#: top-level JSON, tokenizer and chat-template files, and the extra chat templates' folder
_FILES = [name for name in TOKENIZER_FILES if "." in name]
METADATA_PATTERNS = ["*.json", *_FILES, "additional_chat_templates/*"]
METADATA_IGNORE = ["*/*.json", *(f"*/{name}" for name in _FILES)]


class HubError(CheckpointError):
    """A hub id that cannot be had; ``reason`` says why, without the id."""

    def __init__(self, ref: str, reason: str):
        super().__init__(f"{ref}: not a local folder, and {reason}")
        self.reason = reason


def is_hub_id(ref: str | Path | None) -> bool:
    """Whether ``ref`` is shaped like ``org/name`` or ``org/name@revision`` (a ``Path`` too: the
    CLI's path options hand over ``Path`` objects)."""
    return ref is not None and HUB_ID.match(str(ref)) is not None


def resolve_checkpoint(ref: str | Path, *, revision: str | None = None) -> Path:
    """A checkpoint reference as a local folder: an existing path as it is, a hub id as its
    snapshot folder in the hub cache (fetched unless ``HF_HUB_OFFLINE`` is set).

    Anything else, an id the cache lacks while offline, or a hub error is a
    :class:`CheckpointError` naming the reference.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not is_hub_id(ref):
        raise CheckpointError(f"checkpoint not found: {resolve(path)}")
    return hub_snapshot(str(ref), revision=revision)


def is_adapter(ref: str | Path) -> bool:
    """Whether a folder or hub id holds a PEFT adapter (its adapter config), not a model."""
    return (resolve_checkpoint(ref) / ADAPTER_CONFIG_NAME).is_file()


def hub_repo(ref: str | Path) -> str | None:
    """The hub repository ``ref`` names (``org/name``), or None for a local folder."""
    if Path(ref).expanduser().exists() or not is_hub_id(ref):
        return None
    return HUB_ID.match(str(ref))["repo"]


def hub_snapshot(ref: str, *, revision: str | None = None) -> Path:
    """The snapshot folder of hub id ``ref``: the metadata, then the weights it names, fetched
    at the commit the metadata came from (or found in the cache). Asked again in the same
    process (commands resolve an input where they check it and where they load it), the answer
    is remembered, not fetched again; a change of cache folder or offline mode asks anew."""
    return _snapshot(ref, revision, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=64)
def _snapshot(ref: str, revision: str | None, cache: str, offline: bool) -> Path:
    """:func:`hub_snapshot`; ``cache`` and ``offline`` only key the memo (failures are not
    remembered: an exception is never cached)."""
    match = HUB_ID.match(ref)
    if match is None:
        raise CheckpointError(f"{ref}: not a hub id (org/name or org/name@revision)")
    repo_id, pinned = match["repo"], match["rev"]
    if pinned and revision and pinned != revision:
        raise CheckpointError(f"{ref}: revision {pinned} in the id, but revision={revision} given")
    revision = pinned or revision
    folder = _download(ref, repo_id, revision, METADATA_PATTERNS, METADATA_IGNORE)
    allow, ignore = _weight_patterns(folder)
    if allow:  # none: an index without shards, which opening the checkpoint reports
        _download(ref, repo_id, folder.name, allow, ignore)
    return folder


def _download(
    ref: str, repo_id: str, revision: str | None, allow: list[str], ignore: list[str] | None = None
) -> Path:
    """One ``snapshot_download``; its failures become a one-line :class:`CheckpointError`."""
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=allow, ignore_patterns=ignore
            )
        )
    except (OSError, ValueError) as err:  # the hub's errors are OSError or ValueError subclasses
        raise HubError(ref, _reason(err, revision)) from None


def _weight_patterns(folder: Path) -> tuple[list[str], list[str] | None]:
    """The safetensors files a snapshot needs: the index's shards, the adapter's weights, or
    the top-level safetensors files."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = read_json(index).get("weight_map") or {}
        return list(dict.fromkeys(shards.values())), None
    if is_adapter(folder):
        return [ADAPTER_WEIGHTS_NAME], None
    return ["*.safetensors"], ["*/*"]


def _reason(err: OSError | ValueError, revision: str | None) -> str:
    """Why a ``huggingface_hub`` call failed, in a few words."""
    offline = constants.HF_HUB_OFFLINE
    unreachable = "(HF_HUB_OFFLINE is set)" if offline else "(the hub cannot be reached)"
    if isinstance(err, IncompleteSnapshotError):
        return f"only partly in the hub cache {unreachable}"
    if isinstance(err, LocalEntryNotFoundError):
        return f"not in the hub cache {unreachable}"
    if isinstance(err, RevisionNotFoundError):
        return f"no revision {revision} on the hub"
    if isinstance(err, GatedRepoError):
        return "gated on the hub (accept its terms on the model page, then set HF_TOKEN)"
    if isinstance(err, RepositoryNotFoundError):
        return "no such model on the hub (a private one needs HF_TOKEN)"
    lines = str(err).strip().splitlines()
    return f"the hub failed: {lines[0] if lines else type(err).__name__}"
