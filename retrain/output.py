"""The output folder: a PEFT adapter or a full model, a model card and train_log.jsonl,
written into a temporary folder beside ``out`` and renamed into place at the end."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from safealign.checkpoint import AtomicFolder, ModelCard, check_output

LOG_NAME = "train_log.jsonl"


def check_out(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """The output path, refused (before any training) when it holds files and not ``overwrite``,
    or when it is, lies inside or (with ``overwrite``) contains one of ``inputs``."""
    out = check_output(out, inputs, overwrite=True)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"output folder not empty (use --overwrite): {out}")
    return out


def write_atomic(out: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary sibling of ``out``, then replace ``out`` by it (the
    checkpoint writers' :class:`AtomicFolder`: leftovers of killed runs are cleaned up, a
    Ctrl-C during the swap waits for it). ``check_out`` has refused a non-empty ``out``."""
    folder = AtomicFolder(out, (), overwrite=True)
    try:
        write(folder.folder)
        return folder.commit()
    except BaseException:
        folder.discard()
        raise


def save_output(
    out: Path,
    model,
    tokenizer,
    *,
    merge: bool,
    card: ModelCard,
    log: list[dict],
    files: dict[str, str],
) -> Path:
    """Write the trained model (adapter, or merged/full model), card, log and extra files."""

    def write(folder: Path) -> None:
        target = model
        if merge and hasattr(model, "merge_and_unload"):
            target = model.merge_and_unload()
        target.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        base = str(card.base_model) if card.base_model else None
        (folder / "README.md").write_text(card.render(base), encoding="utf-8")
        lines = [json.dumps(row, default=float) for row in log]
        (folder / LOG_NAME).write_text("\n".join(lines) + ("\n" if lines else ""))
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")

    return write_atomic(out, write)
