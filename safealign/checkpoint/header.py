"""Safetensors headers: tensor names, dtypes and shapes without reading tensor data."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from safealign.checkpoint.files import CheckpointError

#: Longest header we accept (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one stored tensor."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # byte range in the data section (0, 0 for a pickle's tensors)
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_raw(file: Path) -> tuple[dict, int]:
    """(the header's JSON object, the size of the data section after it)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than 8 bytes")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8 or length > MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} exceeds file size {size}")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise CheckpointError(f"cannot read safetensors file ({err.strerror}): {file}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt safetensors header ({err}): {file}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header (not a JSON object): {file}")
    return header, size - 8 - length


def _entry(name: str, entry: object, data_size: int, file: Path) -> TensorInfo:
    """One header entry checked: a known dtype, a shape, offsets inside the data section."""
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        code = entry.get("dtype") if isinstance(entry, dict) else None
        raise CheckpointError(f"corrupt safetensors header (dtype {code!r} of {name}): {file}")
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(_integer(d) for d in entry["shape"])
        start, end = (_integer(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"corrupt safetensors header (bad entry {name}): {file}") from None
    if not 0 <= start <= end <= data_size:
        raise CheckpointError(
            f"corrupt safetensors header ({name} lies outside the file, truncated?): {file}"
        )
    if min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != end - start:
        raise CheckpointError(
            f"corrupt safetensors header ({name}: {entry['dtype']} {list(shape)} does not fill "
            f"its {end - start} bytes): {file}"
        )
    return TensorInfo(file, dtype, shape, start, end)


def _integer(value: object) -> int:
    """A JSON integer (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r}")
    return value


def _check_disjoint(infos: dict[str, TensorInfo], file: Path) -> None:
    """Tensors' byte ranges must not overlap (two names aliasing the same bytes)."""
    ranges = sorted((info.start, info.end, name) for name, info in infos.items())
    for (_, end, before), (start, _, name) in zip(ranges, ranges[1:], strict=False):
        if start < end:
            raise CheckpointError(f"corrupt safetensors header ({name} overlaps {before}): {file}")


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header without reading tensor data. A header that lies is refused
    before any tensor is allocated: offsets past the end of the file (a truncated download),
    a dtype and shape that do not fill their byte range, overlapping byte ranges."""
    header, data_size = _read_raw(file)
    infos = {
        name: _entry(name, entry, data_size, file)
        for name, entry in header.items()
        if name != "__metadata__"
    }
    _check_disjoint(infos, file)
    return infos
