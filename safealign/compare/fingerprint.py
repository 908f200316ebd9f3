"""What a stored row was measured with, as one hash: ``--resume`` reuses a row only when the
run that asks would measure it the same way.

The fingerprint covers the method's resolved spec (family, method, options), every input
(a data file by its content, a checkpoint folder by its files' names, sizes and modification
times, an in-memory set by its items) and every setting of the comparison that changes a
row's scores (the evaluator's judge, metric, reply length, batch, device, ``--limit``, seed,
...). Settings that only choose, bound or label rows (:data:`ROW_NEUTRAL`) are left out, so a
rerun with another ``--max-harmful-rate`` reuses what it can.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from safealign.compare.methods import MethodSpec
from safealign.compare.settings import CompareInputs, CompareSettings

#: Settings that change which rows run or how they are judged in the report, never a score.
ROW_NEUTRAL = frozenset(
    {"methods", "max_harmful_rate", "max_over_refusal", "budget_minutes", "utility", "harm",
     "resume", "overwrite"}
)  # fmt: skip


def path_identity(path: Path) -> Any:
    """A file by its content's sha256; a folder by each file's relative name, size and
    modification time (a checkpoint is not read again: a rewrite changes its times)."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return [
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(path.rglob("*"))
            if p.is_file()
        ]
    return str(path)  # a hub id


def value_identity(value: Any) -> Any:
    """An input as JSON-able data: a path by :func:`path_identity`, a set by its items."""
    if value is None:
        return None
    if isinstance(value, str | Path):
        return {"path": str(value), "identity": path_identity(Path(value))}
    return json.loads(json.dumps(list(value), sort_keys=True, default=_plain))


def _plain(item: Any) -> Any:
    return dataclasses.asdict(item) if dataclasses.is_dataclass(item) else str(item)


def run_fingerprint(inputs: CompareInputs, settings: CompareSettings) -> str:
    """The sha256 of the inputs and the score-changing settings, shared by every row."""
    data = {
        "inputs": {
            field.name: value_identity(getattr(inputs, field.name))
            for field in dataclasses.fields(inputs)
        },
        "settings": {k: v for k, v in settings.to_dict().items() if k not in ROW_NEUTRAL},
    }
    return _sha256(data)


def row_fingerprint(spec: MethodSpec, run: str) -> str:
    """One method's row in a run of fingerprint ``run``: its resolved spec added."""
    return _sha256({"method": [spec.spec, spec.family, spec.method, spec.options], "run": run})


def _sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=_plain).encode()).hexdigest()
