"""File names of model and adapter folders, the checkpoint error, and reading their JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import NoReturn

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "additional_chat_templates",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says what and where, one line each."""


_PICKLE_ALLOWED: ContextVar[bool] = ContextVar("pickle_allowed", default=False)


@contextmanager
def allow_pickle(enabled: bool = True) -> Iterator[None]:
    """For the duration, pickle checkpoints (``.bin``) are read (``torch.load`` with
    ``weights_only=True``) when a folder has no safetensors; by default they are refused."""
    token = _PICKLE_ALLOWED.set(enabled)
    try:
        yield
    finally:
        _PICKLE_ALLOWED.reset(token)


def pickle_allowed() -> bool:
    """Whether pickle checkpoints may be read here (inside :func:`allow_pickle`)."""
    return _PICKLE_ALLOWED.get()


def resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def read_json(file: Path) -> dict:
    """The JSON object in ``file``; anything else is a :class:`CheckpointError`."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing {file.name}: {file.parent}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"invalid JSON ({err}): {file}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"invalid JSON (expected an object): {file}")
    return data


def _indexed(folder: Path, index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"index has no weight_map: {index}")
    files = [folder / str(name) for name in dict.fromkeys(weight_map.values())]
    for file in files:
        if file.parent != folder or not file.is_file():
            raise CheckpointError(f"missing shard listed in {index.name}: {file}")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from the index when there is one; its pickle
    files instead when it has no safetensors and pickles are allowed."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.exists():
        return _indexed(folder, index)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if pickle_allowed():
        if (folder / PICKLE_INDEX_NAME).exists():
            return _indexed(folder, folder / PICKLE_INDEX_NAME)
        if (folder / PICKLE_WEIGHTS_NAME).is_file():
            return [folder / PICKLE_WEIGHTS_NAME]
    no_safetensors(folder)


def adapter_weights(folder: Path) -> Path:
    """An adapter folder's weights file: safetensors, or its pickle when pickles are allowed."""
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_PICKLE_NAME):
        if (folder / name).is_file() and (name == ADAPTER_WEIGHTS_NAME or pickle_allowed()):
            return folder / name
    no_safetensors(folder, ADAPTER_WEIGHTS_NAME)


def no_safetensors(folder: Path, expected: str = "*.safetensors") -> NoReturn:
    """Raise: the folder has pickles only (named, with the way out), or no weights at all."""
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not pickle_allowed():
        raise CheckpointError(
            "pickle-only checkpoint (loading a pickle can run code): convert it to safetensors, "
            f"or pass --allow-pickle if you trust its source: {pickles[0]}"
        )
    raise CheckpointError(f"no safetensors weights ({expected}): {folder}")
