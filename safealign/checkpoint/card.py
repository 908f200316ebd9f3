"""The model card: what produced a checkpoint, written as its README.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from safealign import __version__
from safealign.report import markdown_table


def _yaml_scalar(value: str) -> str:
    return json.dumps(str(value))


def _json_cell(value: Any) -> str:
    """Text as written, anything else as JSON (lists, dicts, numbers as given)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _number_cell(value: Any) -> str:
    """Floats with four significant digits, None a dash, the rest as :func:`_json_cell`."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return _json_cell(value) if value is not None else "-"


def _results_table(results: dict) -> str:
    """Rows of dicts -> one table with a column per key; flat dict -> metric | value."""
    if all(isinstance(v, dict) for v in results.values()):
        columns = list(dict.fromkeys(k for row in results.values() for k in row))
        rows = [{"": label, **row} for label, row in results.items()]
        return markdown_table(rows, ["", *columns], cell=_number_cell, align=False)
    rows = [{"metric": k, "value": v} for k, v in results.items()]
    return markdown_table(rows, cell=_number_cell, align=False)


def _pairs_table(items: dict, key: str, value: str) -> str:
    rows = [{key: k, value: v} for k, v in items.items()]
    return markdown_table(rows, cell=_json_cell, align=False)


@dataclass
class ModelCard:
    """What produced a checkpoint; rendered as its README.md."""

    title: str
    method: str
    summary: str
    settings: dict = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    results: dict | None = None
    base_model: str | None = None

    def render(self, base_model: str | None = None) -> str:
        """The README.md text: YAML front matter, summary, settings, inputs and results."""
        base = self.base_model or base_model
        lines = ["---", "library_name: transformers", "tags:", "- safealign"]
        lines.append(f"- {_yaml_scalar(self.method)}")
        if base:
            lines.append(f"base_model: {_yaml_scalar(base)}")
        lines += ["---", "", f"# {self.title}", "", self.summary.strip(), ""]
        lines.append(f"Produced by safealign {__version__} with method `{self.method}`.")
        sections = (
            ("Settings", self.settings and _pairs_table(self.settings, "setting", "value")),
            ("Inputs", self.inputs and _pairs_table(self.inputs, "role", "checkpoint")),
            ("Results", self.results and _results_table(self.results)),
        )
        for title, table in sections:
            if table:
                lines += ["", f"## {title}", "", table]
        return "\n".join(lines) + "\n"
