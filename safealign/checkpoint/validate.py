"""Pair validation: can checkpoints be combined tensor by tensor? Headers only."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from safealign.checkpoint.files import CheckpointError
from safealign.checkpoint.reader import Checkpoint


def _brief(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _family(ckpt: Checkpoint) -> str:
    archs = "/".join(ckpt.architectures) or "no architectures"
    return f"{ckpt.model_type} ({archs})"


def _missing(opened: list[Checkpoint], wanted: list[str]) -> list[str]:
    problems = []
    for ckpt in opened:
        missing = [n for n in wanted if n not in ckpt]
        if missing:
            problems.append(f"{len(missing)} tensors missing ({_brief(missing)}): {ckpt.path}")
    return problems


def _compare(first: Checkpoint, other: Checkpoint, wanted: list[str] | None) -> list[str]:
    """One line per difference between two checkpoints (family, vocabulary, names, shapes)."""
    problems, where = [], f"{first.path} vs {other.path}"
    if (first.model_type, first.architectures) != (other.model_type, other.architectures):
        problems.append(f"architecture differs, {_family(first)} vs {_family(other)}: {where}")
    if first.vocab_size != other.vocab_size:
        problems.append(f"vocab_size differs, {first.vocab_size} vs {other.vocab_size}: {where}")
    a_names, b_names = first.names(), other.names()
    if wanted is None:
        b_set, a_set = set(b_names), set(a_names)
        only_a = [n for n in a_names if n not in b_set]
        only_b = [n for n in b_names if n not in a_set]
        if only_a or only_b:
            problems.append(
                f"tensor names differ, {len(only_a)} only in first ({_brief(only_a)}), "
                f"{len(only_b)} only in second ({_brief(only_b)}): {where}"
            )
        common = [n for n in a_names if n in b_set]
    else:
        common = [n for n in wanted if n in first and n in other]
    shapes = [
        f"{n} {list(first.shape(n))} vs {list(other.shape(n))}"
        for n in common
        if first.shape(n) != other.shape(n)
    ]
    if shapes:
        problems.append(f"{len(shapes)} shapes differ ({_brief(shapes)}): {where}")
    return problems


def validate_checkpoints(
    *ckpts: Checkpoint | str | Path, names: Iterable[str] | None = None
) -> None:
    """Check that checkpoints can be combined tensor by tensor; headers only.

    Every checkpoint is compared with the first: architecture family, vocabulary size, tensor
    names (or only ``names`` when given) and shapes. Raises :class:`CheckpointError` with one
    line per problem.
    """
    opened = [Checkpoint.open(c) for c in ckpts]
    if len(opened) < 2:
        return
    wanted = list(names) if names is not None else None
    problems = _missing(opened, wanted) if wanted is not None else []
    for other in opened[1:]:
        problems += _compare(opened[0], other, wanted)
    if problems:
        raise CheckpointError("\n".join(problems))
