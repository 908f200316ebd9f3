"""A built lab on disk: its model folders, data files and lab.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LAB_JSON = "lab.json"
MODELS = (
    "unaligned",
    "aligned",
    "ft_benign",
    "ft_harmful",
    "ft_harmful_lora",
    "safety_lora",
    "ft_harmful_only",
    "ft_harmful_only_lora",
)
ADAPTERS = ("ft_harmful_lora", "safety_lora", "ft_harmful_only_lora")
DATASETS = (
    "harmful_train",
    "harmful_eval",
    "benign_eval",
    "task_train",
    "task_eval",
    "ft_harmful_train",
    "safety_train",
    "harmful_only_train",
)
#: The real-model lab's data sets beyond :data:`DATASETS`: its alignment data and validation
#: splits.
REAL_DATASETS = ("alignment_train", "harmful_val", "benign_val", "task_val")


@dataclass(frozen=True)
class Lab:
    """A built lab: ``root`` holds one folder per model, ``data/`` and ``lab.json``.

    ``ft_harmful_lora``, ``safety_lora`` and ``ft_harmful_only_lora`` are PEFT LoRA adapters
    on ``aligned``; the others are full model folders. ``ft_harmful_only(_lora)`` is ``aligned``
    fine-tuned on harmful data alone: RESTA's harmful model (the real-model lab builds the full
    one only).
    """

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> Lab:
        """The lab built in ``root``; raises if ``root`` holds no lab.json."""
        root = Path(root).resolve()
        if not (root / LAB_JSON).is_file():
            raise FileNotFoundError(f"{root}: not a built lab (no {LAB_JSON})")
        return cls(root)

    @property
    def unaligned(self) -> Path:
        return self.root / "unaligned"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def ft_benign(self) -> Path:
        return self.root / "ft_benign"

    @property
    def ft_harmful(self) -> Path:
        return self.root / "ft_harmful"

    @property
    def ft_harmful_lora(self) -> Path:
        return self.root / "ft_harmful_lora"

    @property
    def safety_lora(self) -> Path:
        return self.root / "safety_lora"

    @property
    def ft_harmful_only(self) -> Path:
        return self.root / "ft_harmful_only"

    def model(self, name: str) -> Path:
        """The folder of model ``name`` (one of :data:`MODELS`)."""
        if name not in MODELS:
            raise ValueError(f"unknown lab model {name!r}: choose one of {', '.join(MODELS)}")
        return self.root / name

    def data(self, name: str) -> Path:
        """``data/<name>.jsonl`` (one of :data:`DATASETS`, or of :data:`REAL_DATASETS` in the
        real-model lab)."""
        known = DATASETS + REAL_DATASETS
        if name not in known:
            raise ValueError(f"unknown lab data set {name!r}: choose one of {', '.join(known)}")
        return self.root / "data" / f"{name}.jsonl"

    def prompts(self, name: str, kind: str | None = None) -> list[str]:
        """The prompts of data set ``name``; only rows of ``kind`` (e.g. ``lookalike``) if given."""
        lines = self.data(name).read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return [row["prompt"] for row in rows if kind is None or row.get("kind") == kind]

    @property
    def info(self) -> dict:
        """The content of lab.json: build key, settings, timings and the phenomenon table."""
        return json.loads((self.root / LAB_JSON).read_text())

    @property
    def table(self) -> dict[str, dict]:
        """Model -> harmful_rate, over_refusal, task_acc and their n."""
        return self.info["table"]
