"""Writing checkpoints atomically: a temporary folder beside the destination, renamed into
place only when the write finished; an exception leaves the destination untouched.

:class:`CheckpointWriter` writes a model folder, sharded as tensors arrive.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import signal
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import save_file

from safealign.checkpoint.card import ModelCard
from safealign.checkpoint.files import (
    TOKENIZER_FILES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    resolve,
)
from safealign.checkpoint.reader import Checkpoint
from safealign.checkpoint.store import check_finite
from safealign.resources import ResourceError, check_disk, tensor_bytes

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1.5GiB`` or an int (decimal units, like HF)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match[2] not in SIZE_UNITS:
            raise ValueError(f"bad size {size!r}: use bytes or e.g. 500MB, 5GB, 2GiB")
        number = float(match[1]) * SIZE_UNITS[match[2]]
        if not math.isfinite(number):
            raise ValueError(f"bad size {size!r}: too large")
        value = int(number)
    if value <= 0:
        raise ValueError(f"bad size {size!r}: must be positive")
    return value


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _input_folders(item: Checkpoint | str | Path) -> list[Path]:
    if isinstance(item, Checkpoint):
        folders = [item.path]
        if item.base is not None:
            folders.append(item.base.path)
        return folders
    return [resolve(item)]


def check_output(
    out: str | Path, inputs: Iterable[Checkpoint | str | Path | None], overwrite: bool
) -> Path:
    """The resolved output folder, refused when it is an input or inside one, when (with
    ``overwrite``) it contains an input, or when it is a file or, without ``overwrite``, a
    non-empty folder."""
    out = resolve(out)
    for item in inputs:
        for folder in _input_folders(item) if item is not None else []:
            if _is_within(out, folder):
                raise CheckpointError(
                    f"output would overwrite an input checkpoint ({folder}): {out}"
                )
            if overwrite and _is_within(folder, out):
                raise CheckpointError(
                    f"output folder contains an input checkpoint ({folder}): {out}"
                )
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"output exists and is not a folder: {out}")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"output folder not empty (use overwrite): {out}")
    return out


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM are held back for the duration and raised again right after (Python
    handlers, not a thread's signal mask: torch's threads would receive a masked signal)."""
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = [
            signal.signal(s, lambda number, _frame: received.append(number)) for s in signals
        ]
    except ValueError:  # not the main thread: the main thread's handlers stay in charge
        yield
        return
    try:
        yield
    finally:
        for number, handler in zip(signals, previous, strict=True):
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def _side_name(out: Path, kind: str) -> Path:
    """``.NAME.KIND-PID-RANDOM`` beside ``out``: the writing process's id tells whether a
    leftover (from a process killed with SIGKILL) is stale."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders beside ``out`` left by dead processes (a SIGKILL leaves
    no chance to clean up); return them. Folders of running writers are left alone."""
    removed = []
    for kind in ("tmp", "old"):
        for folder in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*-*"):
            pid = folder.name.removeprefix(f".{out.name}.{kind}-").split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                if kind == "old" and not out.exists():
                    folder.rename(out)  # killed between the two renames of a commit
                else:
                    shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


class AtomicFolder:
    """A temporary folder beside ``out`` that replaces ``out`` only on commit. Leftovers of
    writers killed before they could clean up are removed first (:func:`remove_stale`)."""

    def __init__(self, out: str | Path, inputs: Iterable[Checkpoint | str | Path], overwrite: bool):
        if resolve(out).parent.is_dir():
            remove_stale(resolve(out))  # first: it may put back an output a kill took away
        self.out = check_output(out, inputs, overwrite)
        self._folder = _side_name(self.out, "tmp")
        self.done = False

    @property
    def folder(self) -> Path:
        """The temporary folder, created on first use."""
        if not self._folder.exists() and not self.done:
            self._folder.mkdir(parents=True)
        return self._folder

    def commit(self) -> Path:
        """Move the temporary folder to ``out``; an existing ``out`` is replaced only now.
        Ctrl-C (SIGINT) or SIGTERM arriving meanwhile waits until the renames and the removal
        of the replaced folder are done, so it cannot leave a half-finished swap behind."""
        with _signals_deferred():
            old = None
            if self.out.exists():
                old = _side_name(self.out, "old")
                self.out.rename(old)
            try:
                self.folder.rename(self.out)
            except BaseException:
                if old is not None:
                    old.rename(self.out)
                raise
            self.done = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        with _signals_deferred():
            if not self.done:
                shutil.rmtree(self._folder, ignore_errors=True)
                self.done = True


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> None:
    """Copy the named files (or folders) that exist in ``src`` and not yet in ``dst``."""
    for name in names:
        if (dst / name).exists():
            continue
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
        elif (src / name).is_dir():
            shutil.copytree(src / name, dst / name)


def owned(tensor: torch.Tensor, pending: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """A detached, contiguous CPU tensor that owns its storage (no views, no sharing)."""
    tensor = tensor.detach().to("cpu").contiguous()
    storage = tensor.untyped_storage()
    shared = storage.nbytes() != tensor.numel() * tensor.element_size() or any(
        p.untyped_storage().data_ptr() == storage.data_ptr() for p in pending
    )
    return tensor.clone() if shared else tensor


class FolderWriter:
    """What both writers share: files go to a temporary folder beside ``out`` (refused when
    ``out`` is an input, or not empty without ``overwrite``), renamed into place at the end.
    As a context manager, an exception inside (or a missing ``finish``) discards everything."""

    def __init__(self, out: str | Path, inputs: list[Checkpoint | str | Path], overwrite: bool):
        self._atomic = AtomicFolder(out, inputs, overwrite)
        self.out = self._atomic.out

    @property
    def folder(self) -> Path:
        """The temporary folder being written (extra files such as report.json go here)."""
        return self._atomic.folder

    def _check_space(self, needed: int) -> None:
        """Refuse (a :class:`CheckpointError`) when the output's disk lacks ``needed`` bytes."""
        try:
            check_disk(self.out, needed, "the output")
        except ResourceError as err:
            raise CheckpointError(str(err)) from None

    def _check_open(self) -> None:
        if self._atomic.done:
            raise CheckpointError(f"writer already finished or discarded: {self.out}")

    def _commit(self, write: Callable[[ModelCard], None], card: ModelCard) -> Path:
        """``write(card)`` the remaining files, then rename into place; discard on any error."""
        try:
            write(card)
            return self._atomic.commit()
        except BaseException:
            self._atomic.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary folder; the destination stays untouched."""
        self._atomic.discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._atomic.done:
            self.discard()
            raise CheckpointError(f"writer closed without finish(), nothing written: {self.out}")


class CheckpointWriter(FolderWriter):
    """Write a model folder as tensors arrive: shards flushed as they fill, atomic rename at
    :meth:`finish`. Use as a context manager; an exception inside discards everything."""

    def __init__(
        self,
        out: str | Path,
        *,
        source: Checkpoint | str | Path,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        inputs: Iterable[Checkpoint | str | Path] = (),
        config_changes: Mapping[str, Any] | None = None,
    ):
        self.source = Checkpoint.open(source)
        self.config_changes = dict(config_changes or {})
        self.max_shard_size = parse_size(max_shard_size)
        super().__init__(out, [self.source, *inputs], overwrite)
        # The source's bytes as stored: a lower bound of what the output takes.
        self._check_space(tensor_bytes(self.source))
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._dtype_bytes: Counter[torch.dtype] = Counter()
        self.total_size = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; a shard is written when the next tensor would overflow it.

        The writer keeps the tensor until its shard is written: do not modify it in place
        afterwards. Views and tensors sharing storage with a queued one are cloned. A tensor
        holding NaN or Inf is refused: a broken model is never written.
        """
        self._check_open()
        if name in self._names:
            raise CheckpointError(f"tensor {name} added twice: {self.out}")
        check_finite(tensor, name, f"output {self.out}")
        tensor = owned(tensor, self._pending.values())
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._names.add(name)
        self.total_size += size
        self.total_parameters += tensor.numel()
        if tensor.is_floating_point():
            self._dtype_bytes[tensor.dtype] += size

    def _flush(self) -> None:
        if not self._pending:
            return
        self._check_space(self._pending_bytes)
        file = self.folder / f"shard-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._pending, str(file), metadata={"format": "pt"})
        self._shards.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, card: ModelCard) -> Path:
        """Write the last shard, index, config, tokenizer and README.md; rename into place."""
        if not self._names:
            raise CheckpointError(f"no tensors were added: {self.out}")
        return self._commit(self._write_files, card)

    def _write_files(self, card: ModelCard) -> None:
        self._flush()
        self._name_shards()
        self._write_config()
        copy_files(self.source.tokenizer_folder, self.folder, TOKENIZER_FILES)
        (self.folder / "README.md").write_text(
            card.render(_base_model_name(self.source)), encoding="utf-8"
        )

    def _name_shards(self) -> None:
        count = len(self._shards)
        if count == 1:
            self._shards[0][0].rename(self.folder / WEIGHTS_NAME)
            return
        weight_map = {}
        for i, (file, names) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            file.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        metadata = {"total_parameters": self.total_parameters, "total_size": self.total_size}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _write_config(self) -> None:
        """Copy config.json (dtype updated to what was written, ``config_changes`` applied) and
        generation_config.json."""
        config = dict(self.source.config) | self.config_changes
        if self._dtype_bytes:
            written = self._dtype_bytes.most_common(1)[0][0]
            config["dtype"] = str(written).removeprefix("torch.")
            config.pop("torch_dtype", None)
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_files(self.source.model_folder, self.folder, ["generation_config.json"])


def _base_model_name(source: Checkpoint) -> str:
    """The card's ``base_model``: a hub repository where the source came from one."""
    if source.is_adapter:
        named = source.adapter_config.get("base_model_name_or_path")
        return str(named or source.base.hub_repo or source.base.path)
    return source.hub_repo or str(source.path)
