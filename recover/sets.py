"""The prompt and task sets a run reads: loaded once, described in the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safealign.data import PromptSet, TaskExample, TaskSet, load_task, prompt_set
from safealign.eval.smoke import SMOKE_HARMFUL


@dataclass(frozen=True)
class Sets:
    """``harmful`` steers the direction and its gradient, ``eval_harmful`` is scored, ``task``
    (utility) and ``benign`` (over-refusal) are checked, ``task_train`` (and ``benign``) steer
    the rollback gradient."""

    harmful: PromptSet
    eval_harmful: PromptSet
    task: TaskSet | None
    benign: PromptSet | None
    task_train: TaskSet | None = None

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
    ) -> Sets:
        """From paths, loaded sets or lists, each cut to its first ``limit`` items; ``harmful``
        (None: the bundled harmful set) also to its first ``max_prompts``, ``eval_harmful``
        defaulting to it. Without ``task_train``, ``task`` is split: see :func:`split_task`."""
        harmful_set = first(
            first(prompt_set(harmful or SMOKE_HARMFUL, "harmful"), limit), max_prompts
        )
        check = None if task is None else first(task_examples(task), limit)
        if task_train is not None:
            train = first(task_examples(task_train), limit)
        elif check is not None:
            train, check = split_task(check)
        else:
            train = None
        return cls(
            harmful=harmful_set,
            eval_harmful=harmful_set
            if eval_harmful is None
            else first(prompt_set(eval_harmful, "eval_harmful"), limit),
            task=check,
            benign=None if benign is None else first(prompt_set(benign, "benign"), limit),
            task_train=train,
        )

    @property
    def keep_prompts(self) -> list[list[str]]:
        """The prompt lists whose fine-tuned centroids the rollback steers back toward."""
        train = self.task_train
        task = [e.prompt for e in train.examples] if train is not None else None
        benign = self.benign.prompts if self.benign is not None else None
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


def split_task(task: TaskSet) -> tuple[TaskSet, TaskSet]:
    """(train, check): the first floor(n/2) examples steer the rollback gradient, the other
    ceil(n/2) are checked for utility, so the guard never scores the examples that steer it.
    A single example is both (there is nothing to split)."""
    examples = task.examples
    if len(examples) < 2:
        return task, task
    half = len(examples) // 2
    return (
        TaskSet(examples[:half], f"{task.name}[:{half}]", task.path),
        TaskSet(examples[half:], f"{task.name}[{half}:]", task.path),
    )
