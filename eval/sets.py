"""The sets an evaluation scores: prompt lists (harmful, benign) and task examples, from a
path, a loaded set or a list in memory, each with a name and a content hash for reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safealign.data import PromptSet, content_hash, load_prompts, load_task, prompt_set
from safealign.eval.metrics import Metric
from safealign.rows import DataError, read_rows


@dataclass(frozen=True)
class TaskList:
    name: str
    examples: list
    hash: str


def limited_prompts(source, role: str, limit: int | None) -> PromptSet | None:
    """The :func:`~safealign.data.prompt_set` of ``source`` (None stays None), its first
    ``limit`` prompts."""
    if source is None:
        return None
    prompts = prompt_set(source, role)
    if limit and len(prompts) > limit:
        return PromptSet(prompts.prompts[:limit], prompts.name, prompts.path)
    return prompts


@dataclass(frozen=True)
class Example:
    """A task example; ``choices`` for multiple choice, ``answer`` None for plain text."""

    prompt: str
    answer: str | int | list[str] | None = None
    choices: list[str] | None = None


def _example(item) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, dict):
        return Example(item["prompt"], item.get("answer"), item.get("choices"))
    return Example(item.prompt, item.answer, getattr(item, "choices", None))


def row_choices(row) -> list[str]:
    """A row's ``choices`` list, or its lettered columns A, B, C, ... (MMLU-style CSV)."""
    value = row.value if isinstance(row.value, dict) else {}
    lower = {k.lower(): v for k, v in value.items()}
    if isinstance(lower.get("choices"), list):
        return [str(c) for c in lower["choices"]]
    letters = []
    for letter in "abcdefghij":
        if letter not in lower:
            break
        letters.append(str(lower[letter]))
    if len(letters) < 2:
        raise DataError(f"no 'choices' list or A/B/... columns: {row.where}")
    return letters


def load_examples(path: str | Path, metric: Metric) -> tuple[str, list[Example]]:
    """Task examples from a file as ``metric`` needs them (choices, or text without answers)."""
    try:
        task = load_task(path)
        examples = [Example(e.prompt, e.answer) for e in task.examples]
    except DataError:
        if metric.needs_answer:
            raise
        prompts = load_prompts(path)
        return prompts.name, [Example(p) for p in prompts.prompts]
    if metric.needs_choices:
        rows = read_rows(path)
        examples = [
            Example(e.prompt, e.answer, row_choices(row))
            for e, row in zip(examples, rows, strict=True)
        ]
    return task.name, examples


def as_task_list(source, metric: Metric, limit: int | None) -> TaskList | None:
    """A task set from a path, a loaded TaskSet or a list of examples (objects or dicts)."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        name, examples = load_examples(source, metric)
    elif hasattr(source, "examples"):
        name, examples = source.name, [_example(e) for e in source.examples]
    elif isinstance(source, Sequence):
        name, examples = "task (in memory)", [_example(e) for e in source]
    else:
        raise TypeError("task: expected a path, a TaskSet or a list of examples")
    if not examples:
        raise ValueError("task: the task set is empty")
    examples = examples[:limit] if limit else examples
    return TaskList(name, examples, content_hash(examples))
