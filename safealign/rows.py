"""Records of data files: JSONL, JSON, CSV, TSV and TXT read into rows, errors naming the
file (and the line when one row is at fault)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
}


class DataError(ValueError):
    """A data file cannot be used; the message says what and where (file, and line)."""


@dataclass(frozen=True)
class Row:
    """One record of a data file: an object's fields, or a bare string."""

    value: dict[str, Any] | str
    where: str  # "file:line" or "file item N"

    def fields(self) -> list[str]:
        return list(self.value) if isinstance(self.value, dict) else []


def read_rows(path: str | Path) -> list[Row]:
    """All records of a data file, by extension; raises :class:`DataError` if none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a file: {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"unsupported format {path.suffix or '(no extension)'!r} "
            f"(use {', '.join(FORMATS)}): {path}"
        )
    text = _decode(path)
    if not text.strip():
        raise DataError(f"empty file: {path}")
    rows = READERS[kind](text, path)
    if not rows:
        raise DataError(f"no rows: {path}")
    return rows


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}, line {line}): {path}"
        ) from None


def _read_jsonl(text: str, path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise DataError(f"malformed JSON ({_json_problem(err)}): {path}:{number}") from None
        rows.append(_row(value, f"{path}:{number}"))
    return rows


def _read_json(text: str, path: Path) -> list[Row]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        line = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"malformed JSON ({_json_problem(err)}): {path}{line}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        key = "data" if "data" in lists else lists[0] if len(lists) == 1 else None
        if key is None:
            raise DataError(
                f"JSON object without a 'data' list (keys: {', '.join(data) or 'none'}): {path}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"JSON must be a list of objects or strings, or {{'data': [...]}}: {path}")
    return [_row(value, f"{path} item {i}") for i, value in enumerate(data, start=1)]


def _json_problem(error: Exception) -> str:
    """What the JSON parser refused, briefly (nesting too deep, a number too long, ...)."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0].split(":")[0]


def _row(value: Any, where: str) -> Row:
    if not isinstance(value, (dict, str)):
        raise DataError(f"expected an object or a string, got {type(value).__name__}: {where}")
    return Row(value, where)


def _read_delimited(text: str, path: Path, delimiter: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames
        if not header or not any(h.strip() for h in header):
            raise DataError(f"no header row: {path}")
        rows = []
        for record in reader:
            values = {k.strip(): v for k, v in record.items() if k is not None}
            if any(v not in (None, "") for v in values.values()):
                rows.append(Row(values, f"{path}:{reader.line_num}"))
    except csv.Error as err:
        raise DataError(f"malformed CSV ({err}): {path}:{reader.line_num}") from None
    return rows


def _read_txt(text: str, path: Path) -> list[Row]:
    return [
        Row(line, f"{path}:{number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda text, path: _read_delimited(text, path, ","),
    "tsv": lambda text, path: _read_delimited(text, path, "\t"),
    "txt": _read_txt,
}
