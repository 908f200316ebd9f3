"""File names of model and adapter folders, the checkpoint error, and reading their JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
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


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from the index when there is one."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"index has no weight_map: {index}")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"missing shard listed in {index.name}: {file}")
        return files
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    no_safetensors(folder)


def no_safetensors(folder: Path, expected: str = "*.safetensors") -> NoReturn:
    """Raise: the folder has pickles only (named), or no weights at all."""
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"pickle-only checkpoint, safetensors required (convert it first): {pickles[0]}"
        )
    raise CheckpointError(f"no safetensors weights ({expected}): {folder}")
