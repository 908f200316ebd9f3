"""Run reports: JSON files and markdown tables."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3f}"
    return str(value)


def _escape(text: str) -> str:
    """A cell's text kept inside its cell: pipes escaped, line breaks as spaces."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    cell: Callable[[Any], str] = _cell,
    align: bool = True,
) -> str:
    """Render rows of dicts as a markdown table. ``cell`` formats a value (default: floats
    with three decimals, None a dash); ``align`` pads columns to one width for reading as
    text, ``align=False`` writes compact rows (model cards)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_escape(cell(row.get(c))) for c in columns] for row in rows]
    if align:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        widths = [0] * len(columns)
        rule = "|" + " --- |" * len(columns)
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        rule,
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join(lines)
