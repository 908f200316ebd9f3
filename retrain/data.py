"""Training examples as token ids with the trained span marked, batches, and the data order.

An example is ``(ids, start)``: the loss covers ``ids[start:]`` (the reply and its EOS for chat
data, every token for raw text). The order of a run is a pure function of the seed, so a
resumed run takes exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from safealign.chat import encode_pairs
from safealign.data import DataError, load_pairs, prompt_set, read_rows
from safealign.eval.smoke import SMOKE_BENIGN, SMOKE_HARMFUL

Example = tuple[list[int], int]
#: The ``kind`` of a task example in a data row, as the labs write it; rows of any other kind
#: are harmful examples (the probe critic's AUROC on the fine-tune's examples).
TASK_KIND = "task"


def load_texts(path: str | Path) -> list[str]:
    """Raw texts: a ``text`` field per row, or the rows of a text file."""
    texts = []
    for row in read_rows(path):
        value = row.value.get("text") if isinstance(row.value, dict) else row.value
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"no text (need a 'text' field or plain lines): {row.where}")
        texts.append(value)
    return texts


def encode_texts(tokenizer, texts: Sequence[str]) -> list[Example]:
    """Every token trained (the first has no context and is never predicted)."""
    return [(tokenizer(t, add_special_tokens=True)["input_ids"], 0) for t in texts]


def fit_length(examples: Sequence[Example], max_length: int, where: str) -> list[int]:
    """Indices of the examples that keep a trained token within ``max_length`` (the others'
    prompts are too long). Raises :class:`DataError` when none is left."""
    kept = [i for i, (_, start) in enumerate(examples) if start < max_length - 1]
    if not kept:
        raise DataError(f"every prompt is longer than --max-length {max_length}: {where}")
    return kept


class TrainingData(NamedTuple):
    """A run's examples, their prompts and each row's ``kind`` field (None where absent)."""

    examples: list[Example]
    prompts: list[str]
    kinds: list[str | None]


def row_kinds(path: str | Path) -> list[str | None]:
    """Each row's ``kind`` text (the labs' files: ``task`` or a harmful category), or None."""
    kinds = []
    for row in read_rows(path):
        value = row.value.get("kind") if isinstance(row.value, dict) else None
        kinds.append(value if isinstance(value, str) and value else None)
    return kinds


def load_examples(tokenizer, path: str | Path, *, text: bool, max_length: int) -> TrainingData:
    """Encoded examples cut to ``max_length``, their prompts (raw text with ``text``) and
    kinds."""
    if text:
        prompts = load_texts(path)
        examples = encode_texts(tokenizer, prompts)
    else:
        pairs = load_pairs(path)
        prompts = [pair.prompt for pair in pairs]
        examples = encode_pairs(tokenizer, pairs)
    kinds = row_kinds(path)
    kept = fit_length(examples, max_length, str(path))
    return TrainingData(
        [(examples[i][0][:max_length], examples[i][1]) for i in kept],
        [prompts[i] for i in kept],
        [kinds[i] for i in kept],
    )


def harmful_labels(kinds: Sequence[str | None]) -> list[int | None]:
    """1 for a harmful example, 0 for a task one (:data:`TASK_KIND`), None when unlabelled."""
    return [None if kind is None else int(kind != TASK_KIND) for kind in kinds]


@dataclass(frozen=True)
class Step:
    """One optimiser step: its epoch and its micro-batches (example indices) for this process."""

    epoch: int
    micro: tuple[tuple[int, ...], ...]


def schedule(
    n: int,
    *,
    batch_size: int,
    grad_accum: int,
    epochs: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> list[Step]:
    """Every step of the run. Each epoch is a fresh permutation seeded by ``(seed, epoch)``,
    cut into micro-batches of ``batch_size`` per process; ``grad_accum`` rounds of ``world``
    micro-batches make a step (the epoch's last step may hold fewer; with several processes
    the epoch's last incomplete round is dropped)."""
    steps = []
    per_round = batch_size * world
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        rounds = [order[i : i + per_round] for i in range(0, n, per_round)]
        if world > 1 and len(rounds[-1]) < per_round:
            rounds.pop()  # every process needs a micro-batch in every round (DDP)
        for first in range(0, len(rounds), grad_accum):
            mine = []
            for chunk in rounds[first : first + grad_accum]:
                part = tuple(chunk[rank * batch_size : (rank + 1) * batch_size])
                if part:
                    mine.append(part)
            steps.append(Step(epoch, tuple(mine)))
    return steps


#: The bundled prompt sets a run's ``harmful`` and ``benign`` default to.
BUNDLED = {"harmful": SMOKE_HARMFUL, "benign": SMOKE_BENIGN}


def run_prompts(path: str | Path | None, role: str) -> list[str]:
    """The prompts of ``--harmful``/``--benign`` (``role``), or the bundled set of that role."""
    return prompt_set(path or BUNDLED[role], role).prompts


def disjoint(prompts: Sequence[str], taken: Collection[str]) -> tuple[list[str], int]:
    """``prompts`` without repeats and without those in ``taken`` (exact text), in order, and
    how many were dropped."""
    kept = [p for p in dict.fromkeys(prompts) if p not in taken]
    return kept, len(prompts) - len(kept)


def held_apart(
    path: str | Path | None, role: str, taken: Collection[str], needed_by: str
) -> tuple[list[str], int]:
    """The ``role`` prompts (:func:`run_prompts`) apart from the fine-tune's prompts
    ``taken`` (:func:`disjoint`); none left is a :class:`DataError` naming ``needed_by``."""
    kept, dropped = disjoint(run_prompts(path, role), taken)
    if not kept:
        raise DataError(
            f"{needed_by}: every --{role} prompt is also a prompt of --data; "
            f"give {role} prompts apart from the fine-tuning data"
        )
    return kept, dropped
