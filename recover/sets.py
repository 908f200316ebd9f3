"""The prompt and task sets a run reads: loaded once, described in the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safealign.data import PromptSet, TaskExample, TaskSet, load_task, prompt_set
from safealign.eval.smoke import SMOKE_HARMFUL


@dataclass(frozen=True)
class Sets:
    """``harmful`` steers the direction and its gradient, ``eval_harmful`` is scored, ``task``
    (utility) and ``benign`` (over-refusal) are checked, ``task_train`` and ``benign_train``
    steer the rollback gradient: a check never scores the prompts that steer it."""

    harmful: PromptSet
    eval_harmful: PromptSet
    task: TaskSet | None
    benign: PromptSet | None
    task_train: TaskSet | None = None
    benign_train: PromptSet | None = None

    @classmethod
    def load(
        cls,
        harmful,
        eval_harmful,
        task,
        benign,
        max_prompts: int | None,
        task_train=None,
        limit: int | None = None,
        benign_train=None,
    ) -> Sets:
        """From paths, loaded sets or lists, each cut to its first ``limit`` items; ``harmful``
        (None: the bundled harmful set) also to its first ``max_prompts``, ``eval_harmful``
        defaulting to it. Without ``task_train``, ``task`` is split, and without
        ``benign_train``, ``benign``: see :func:`split_half`."""
        harmful_set = first(
            first(prompt_set(harmful or SMOKE_HARMFUL, "harmful"), limit), max_prompts
        )
        check = None if task is None else first(task_examples(task), limit)
        if task_train is not None:
            train = first(task_examples(task_train), limit)
        elif check is not None:
            train, check = split_half(check)
        else:
            train = None
        benign_check = None if benign is None else first(prompt_set(benign, "benign"), limit)
        if benign_train is not None:
            benign_steer = first(prompt_set(benign_train, "benign_train"), limit)
        elif benign_check is not None:
            benign_steer, benign_check = split_half(benign_check)
        else:
            benign_steer = None
        return cls(
            harmful=harmful_set,
            eval_harmful=harmful_set
            if eval_harmful is None
            else first(prompt_set(eval_harmful, "eval_harmful"), limit),
            task=check,
            benign=benign_check,
            task_train=train,
            benign_train=benign_steer,
        )

    @property
    def keep_prompts(self) -> list[list[str]]:
        """The prompt lists whose fine-tuned centroids the rollback steers back toward."""
        train = self.task_train
        task = [e.prompt for e in train.examples] if train is not None else None
        benign = self.benign_train.prompts if self.benign_train is not None else None
        return [prompts for prompts in (task, benign) if prompts]

    def describe(self) -> dict[str, dict | None]:
        """Name, size and content hash of each set (report.json's ``sets``)."""
        return {
            role: None if item is None else {"name": item.name, "n": len(item), "hash": item.hash}
            for role, item in (
                ("harmful", self.harmful),
                ("eval_harmful", self.eval_harmful),
                ("task", self.task),
                ("task_train", self.task_train),
                ("benign", self.benign),
                ("benign_train", self.benign_train),
            )
        }


def first(items: PromptSet | TaskSet, n: int | None) -> PromptSet | TaskSet:
    """The first ``n`` prompts or examples (all of them when ``n`` is None or not smaller)."""
    if n is None or len(items) <= n:
        return items
    if isinstance(items, PromptSet):
        return PromptSet(items.prompts[:n], f"{items.name}[:{n}]", items.path)
    return TaskSet(items.examples[:n], f"{items.name}[:{n}]", items.path)


def task_examples(source) -> TaskSet:
    """Task examples from a path, a TaskSet or a list of dicts/objects with prompt and answer."""
    if isinstance(source, (str, Path)):
        source = load_task(source)
    elif not isinstance(source, TaskSet):
        examples = [
            TaskExample(e["prompt"], e["answer"])
            if isinstance(e, dict)
            else TaskExample(e.prompt, e.answer)
            for e in source
        ]
        source = TaskSet(examples, "task")
    if not source.examples:
        raise ValueError("task: the task set is empty")
    return source


def split_half(items: PromptSet | TaskSet) -> tuple[PromptSet | TaskSet, PromptSet | TaskSet]:
    """(steer, check): the first floor(n/2) task examples or benign prompts steer the rollback
    gradient, the other ceil(n/2) are checked (utility, over-refusal), so the guard never
    scores what steers it. A single item is both (there is nothing to split)."""
    if len(items) < 2:
        return items, items
    half = len(items) // 2
    kind = type(items)
    values = items.examples if isinstance(items, TaskSet) else items.prompts
    return (
        kind(values[:half], f"{items.name}[:{half}]", items.path),
        kind(values[half:], f"{items.name}[{half}:]", items.path),
    )
