"""Prompt sets, task sets and chat training pairs from JSONL, JSON, CSV, TSV and TXT files.

Fields are found by name, case-insensitively: prompts in ``prompt``, ``goal``, ``instruction``,
``question`` or ``behavior``; answers in ``answer``, ``target``, ``response`` or ``output``.
Standard benchmark files load by path: AdvBench (``goal``, ``target``), JailbreakBench
(``Goal``), HarmBench (``Behavior``, with ``ContextString`` prepended as HarmBench does),
XSTest (``prompt`` with ``label`` or ``type`` for ``label="safe"|"unsafe"`` filtering).
Every error names the file, and the line when one row is at fault.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from safealign.rows import DataError, Row, read_rows

# DataError and read_rows are part of this module's API (re-exported from safealign.rows).
__all__ = [
    "ANSWER_FIELDS",
    "ChatPair",
    "DataError",
    "PROMPT_FIELDS",
    "PromptSet",
    "RESPONSE_FIELDS",
    "TaskExample",
    "TaskSet",
    "content_hash",
    "load_pairs",
    "load_prompts",
    "prompt_set",
    "load_task",
    "read_rows",
]

PROMPT_FIELDS = ("prompt", "goal", "instruction", "question", "behavior")
ANSWER_FIELDS = ("answer", "target", "response", "output")
RESPONSE_FIELDS = ("response", "output", "completion", "answer", "target")
LABELS = ("safe", "unsafe")


def content_hash(items: Any) -> str:
    """First 16 hex digits of the sha256 of the items' canonical JSON."""
    text = json.dumps(_plain(items), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class PromptSet:
    """Prompts from one file (or list), with a name and a content hash for reports."""

    prompts: list[str]
    name: str
    path: Path | None = None
    hash: str = dataclass_field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", content_hash(self.prompts))

    @classmethod
    def from_list(cls, prompts: Sequence[str], name: str = "prompts") -> PromptSet:
        return cls(list(prompts), name)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __getitem__(self, index):
        return self.prompts[index]


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TaskSet:
    """Prompt/answer examples from one file, with a name and a content hash."""

    examples: list[TaskExample]
    name: str
    path: Path | None = None
    hash: str = dataclass_field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", content_hash(self.examples))

    @property
    def prompts(self) -> list[str]:
        return [e.prompt for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[TaskExample]:
        return iter(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


@dataclass(frozen=True)
class ChatPair:
    """One training exchange: a user prompt and the assistant's response."""

    prompt: str
    response: str
    system: str | None = None


# ----------------------------------------------------------------------------- fields


def _key(row: Row, names: Sequence[str]) -> str | None:
    """The row's actual key for the first of ``names`` it has (case-insensitive)."""
    if not isinstance(row.value, dict):
        return None
    lower = {k.lower(): k for k in row.value}
    for name in names:
        if name in row.value:
            return name
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _field(row: Row, override: str | None, candidates: Sequence[str], role: str) -> tuple[str, str]:
    """(key, text) of the row's ``role`` field: ``override`` if given, else the first candidate."""
    names = [override] if override else list(candidates)
    key = _key(row, names)
    if key is None:
        if isinstance(row.value, str):
            raise DataError(f"no {role} field, rows are plain strings: {row.where}")
        fields = ", ".join(row.fields()) or "none"
        if override:
            raise DataError(f"missing {role} field '{override}' (fields: {fields}): {row.where}")
        raise DataError(
            f"missing {role} field (looked for {', '.join(candidates)}; fields: {fields}): "
            f"{row.where}"
        )
    return key, _text(row.value[key], key, row)


def _text(value: Any, key: str, row: Row) -> str:
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise DataError(f"field '{key}' is not text ({type(value).__name__}): {row.where}")
    if isinstance(value, (int, float)):
        value = str(value)
    if value is None or not value.strip():
        raise DataError(f"empty field '{key}': {row.where}")
    return value


def _optional(row: Row, name: str) -> str:
    key = _key(row, [name])
    value = row.value.get(key) if key else None
    return value.strip() if isinstance(value, str) else ""


def _prompt(row: Row, override: str | None) -> str:
    """The row's prompt; Alpaca ``input`` and HarmBench ``ContextString`` are joined in."""
    if isinstance(row.value, str) and not override:
        if not row.value.strip():
            raise DataError(f"empty prompt: {row.where}")
        return row.value
    key, text = _field(row, override, PROMPT_FIELDS, "prompt")
    if key.lower() == "instruction" and (extra := _optional(row, "input")):
        return f"{text}\n\n{extra}"
    if key.lower() == "behavior" and (context := _optional(row, "contextstring")):
        return f"{context}\n\n---\n\n{text}"
    return text


def _label(row: Row) -> str | None:
    """XSTest-style safety label: ``label`` column, else ``type`` (``contrast_*`` = unsafe)."""
    label = _optional(row, "label").lower()
    if label in LABELS:
        return label
    kind = _optional(row, "type").lower()
    if kind:
        return "unsafe" if kind.startswith("contrast") else "safe"
    return None


# ----------------------------------------------------------------------------- loaders


def load_prompts(
    path: str | Path, field: str | None = None, *, label: str | None = None
) -> PromptSet:
    """Prompts from a file; ``label="safe"|"unsafe"`` keeps XSTest-style rows with that label."""
    path = Path(path)
    rows = read_rows(path)
    name = path.stem
    if label is not None:
        if label not in LABELS:
            raise DataError(f"label must be 'safe' or 'unsafe', got {label!r}: {path}")
        if all(_label(row) is None for row in rows):
            raise DataError(
                f"no label or type column to filter by (fields: "
                f"{', '.join(rows[0].fields()) or 'none'}): {path}"
            )
        rows = [row for row in rows if _label(row) == label]
        if not rows:
            raise DataError(f"no rows labelled {label!r}: {path}")
        name = f"{name}[{label}]"
    return PromptSet([_prompt(row, field) for row in rows], name, path)


def prompt_set(source: Any, role: str) -> PromptSet:
    """The one way a prompt source becomes a :class:`PromptSet`: a path, a PromptSet, a
    TaskSet (its prompts) or a list of prompts (strings, or examples with a ``prompt``), named
    ``role`` when in memory. An empty set is refused, naming ``role``."""
    if isinstance(source, str | Path):
        source = load_prompts(source)
    elif isinstance(source, TaskSet):
        source = PromptSet(source.prompts, source.name, source.path)
    elif isinstance(source, Sequence) and not isinstance(source, PromptSet):
        source = PromptSet([getattr(p, "prompt", p) for p in source], role)
    elif not isinstance(source, PromptSet):
        raise TypeError(f"{role}: expected a path, a PromptSet or a list of prompts")
    if not all(isinstance(p, str) for p in source.prompts):
        raise TypeError(f"{role}: expected a path, a PromptSet or a list of prompts")
    if not source.prompts:
        raise ValueError(f"{role}: the prompt set is empty")
    return source


def load_task(
    path: str | Path, prompt_field: str | None = None, answer_field: str | None = None
) -> TaskSet:
    """Prompt/answer examples from a file."""
    path = Path(path)
    examples = [
        TaskExample(
            _prompt(row, prompt_field), _field(row, answer_field, ANSWER_FIELDS, "answer")[1]
        )
        for row in read_rows(path)
    ]
    return TaskSet(examples, path.stem, path)


def load_pairs(
    path: str | Path, prompt_field: str | None = None, response_field: str | None = None
) -> list[ChatPair]:
    """Training pairs: prompt/response fields, or a chat ``messages`` list per row."""
    pairs = []
    for row in read_rows(path):
        if isinstance(row.value, dict) and (key := _key(row, ["messages"])):
            pairs.append(_pair_from_messages(row.value[key], row))
        else:
            response = _field(row, response_field, RESPONSE_FIELDS, "response")[1]
            pairs.append(ChatPair(_prompt(row, prompt_field), response))
    return pairs


def _pair_from_messages(messages: Any, row: Row) -> ChatPair:
    """[system?], user, assistant -> ChatPair; anything else is refused, not guessed."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"'messages' must be a list of {{role, content}} objects: {row.where}")
    turns = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise DataError(
                f"bad message (need role system/user/assistant and text content): {row.where}"
            )
        turns.append((role, content))
    system = turns.pop(0)[1] if turns and turns[0][0] == "system" else None
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"]:
        shape = " -> ".join(roles) or "no turns"
        raise DataError(
            f"messages must be one user turn then one assistant turn, got {shape}: {row.where}"
        )
    (_, prompt), (_, response) = turns
    if not prompt.strip() or not response.strip():
        raise DataError(f"empty message content: {row.where}")
    return ChatPair(prompt, response, system)
