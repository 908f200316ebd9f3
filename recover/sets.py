"""The prompt and task sets a run reads: loaded once, described in the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safealign.data import PromptSet, TaskExample, TaskSet, load_prompts, load_task


@dataclass(frozen=True)
class Sets:
    """``harmful`` steers the direction and its gradient, ``eval_harmful`` is scored each step,
    ``task`` (utility) and ``benign`` (over-refusal) are checked and steer the rollback."""

    harmful: PromptSet
    eval_harmful: PromptSet
    task: TaskSet | None
    benign: PromptSet | None

    @classmethod
    def load(cls, harmful, eval_harmful, task, benign, max_prompts: int | None) -> Sets:
        """From paths, loaded sets or lists; ``harmful`` cut to its first ``max_prompts``
        (None: the bundled harmful set), ``eval_harmful`` defaulting to it."""
        harmful_set = prompt_set(harmful, "harmful")
        if max_prompts is not None and len(harmful_set) > max_prompts:
            harmful_set = PromptSet(
                harmful_set.prompts[:max_prompts], harmful_set.name, harmful_set.path
            )
        return cls(
            harmful=harmful_set,
            eval_harmful=harmful_set
            if eval_harmful is None
            else prompt_set(eval_harmful, "eval_harmful"),
            task=None if task is None else task_examples(task),
            benign=None if benign is None else prompt_set(benign, "benign"),
        )

    @property
    def keep_prompts(self) -> list[list[str]]:
        """The prompt lists whose fine-tuned centroids the rollback steers back toward."""
        task = [e.prompt for e in self.task.examples] if self.task is not None else None
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
                ("benign", self.benign),
            )
        }


def prompt_set(source, role: str) -> PromptSet:
    """Prompts from a path, a PromptSet or a list of strings (None: the bundled harmful set)."""
    if source is None:
        from safealign.eval.smoke import SMOKE_HARMFUL

        source = SMOKE_HARMFUL
    if isinstance(source, (str, Path)):
        source = load_prompts(source)
    elif not isinstance(source, PromptSet):
        source = PromptSet.from_list([str(p) for p in source], name=role)
    if not source.prompts:
        raise ValueError(f"{role}: the prompt set is empty")
    return source


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
