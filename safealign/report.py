"""Run reports: JSON files, markdown tables and the harmful-rate / utility trade-off plot."""

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


def tradeoff_plot(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    x: str = "harmful_rate",
    y: str = "utility",
    label: str = "name",
) -> Path | None:
    """Scatter utility against harmful rate, one point per row, named in a legend beside the
    axes (points of different rows often coincide, so labels on the points would overlap).

    Returns the written PNG path, or None when matplotlib (the ``plot`` extra) is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = "osD^v<>PX*"
    for i, row in enumerate(rows):
        if row.get(x) is None or row.get(y) is None:
            continue
        ax.scatter(
            row[x],
            row[y],
            marker=markers[i % len(markers)],
            s=60,
            alpha=0.8,
            label=str(row.get(label, "")),
        )
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel(f"{x} (lower is safer)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
