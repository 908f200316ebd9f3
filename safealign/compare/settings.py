"""What ``safealign compare`` takes: the user's checkpoints and data, and its settings."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from safealign.checkpoint import Checkpoint, CheckpointError, validate_checkpoints
from safealign.checkpoint.hub import is_adapter, is_hub_id, resolve_checkpoint
from safealign.eval.settings import DRIFT_TOKENS
from safealign.settings import Settings, SettingsError, setting

#: Inputs that name a checkpoint: a folder or a hub id.
CHECKPOINTS = ("aligned", "finetuned", "unaligned", "safety", "harmful_model")


@dataclass(frozen=True)
class CompareInputs:
    """The checkpoints and data sets a comparison runs on; ``None`` where not given.

    ``harmful``/``task``/``benign`` score every model. The ``*_train`` sets are what methods
    may learn or check on (recover's direction, utility check and over-refusal guard); each
    falls back to the scoring set of its kind when not given, and the report says so.
    ``guard`` is recover's over-refusal guard alone (``benign_train`` when not given).
    """

    aligned: Path
    finetuned: Path
    unaligned: Path | None = None
    safety: Path | None = None
    #: A fine-tuned on harmful data (RESTA's harmful model; resta is skipped without it)
    harmful_model: Path | None = None
    train_data: Path | None = None
    harmful: Any = None
    task: Any = None
    benign: Any = None
    harmful_train: Any = None
    task_train: Any = None
    benign_train: Any = None
    #: Benign prompts recover's over-refusal guard steers and checks on (default: benign_train)
    guard: Any = None
    #: Benign task data (prompt and reply pairs) the durability fine-tune trains on
    durability_data: Path | None = None

    def given(self, name: str) -> bool:
        return getattr(self, name) is not None

    def to_dict(self) -> dict[str, Any]:
        """Paths as text; in-memory sets as a count."""
        out = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or isinstance(value, str | Path):
                out[field.name] = None if value is None else str(value)
            else:
                out[field.name] = f"{len(value)} items"
        return out


@dataclass
class CompareSettings(Settings):
    """Settings of one comparison (methods, the shared evaluator, the run's limits)."""

    methods: tuple[str, ...] = setting(
        (),
        help="Methods to run, e.g. recover,safe_lora:tau=0.35,retrain:kl (default: every "
        "method whose inputs were given).",
    )
    max_harmful_rate: float | None = setting(
        None,
        help="Recommend only methods at or under this harmful rate.",
        min=0,
        max=1,
        default_text="A's harmful rate + 0.05",
    )
    max_over_refusal: float | None = setting(
        None,
        help="Recommend only methods at or under this over-refusal.",
        min=0,
        max=1,
        default_text="A's over-refusal + 0.05",
    )
    budget_minutes: float | None = setting(
        None, help="Start no method once this many minutes are spent.", min=0, min_open=True
    )
    retrain_options: str = setting(
        "",
        help="Options every retrain:REG method takes (its own win), e.g. epochs=3,lr=0.003.",
    )
    judge: str = setting("keyword", help="Harmful-response judge, shared by every score.")
    metric: str = setting("exact_match", help="Task metric, shared by every score.")
    drift_tokens: int = setting(
        DRIFT_TOKENS,
        min=1,
        help="Drift from B on the benign prompts: reply positions compared per prompt.",
    )
    durability: int | None = setting(
        None,
        min=0,
        help="Durability of every row: its harmful rate after N LoRA steps of retrain's sft on "
        "--durability-data (harmful_rate_after_finetune; 0: the harmful rate itself).",
    )
    durability_options: str = setting(
        "", help="The durability fine-tune's retrain options, e.g. lr=0.003,grad_batch_size=16."
    )
    harm: str = setting(
        "now",
        choices=("now", "durable"),
        help="What the plot, the Pareto front, the harmful-rate bound and the recommendation "
        "take as harm: now (the harmful rate) or durable (after --durability steps).",
    )
    utility: str = setting(
        "task",
        choices=("task", "drift"),
        help="What the plot, the Pareto front and the recommendation take as utility: task "
        "(the task metric, higher is better) or drift (from B on --benign, lower is better).",
    )
    batch_size: int = setting(32, help="Generation batch size.", min=1)
    max_new_tokens: int = setting(48, help="Tokens generated per reply.", min=1)
    device: str | None = setting(None, help="cpu, cuda, cuda:1, ...", default_text="cpu")
    limit: int | None = setting(None, min=1, help="Applies to the shared evaluator's sets.")
    seed: int = setting(0, min=0, help="The evaluator's and every retrain:REG method's seed.")
    resume: bool = setting(False, help="Reuse finished methods' outputs and scores in --out.")
    overwrite: bool = setting(False, help="Replace a non-empty --out (ignored with --resume).")


def check_inputs(inputs: CompareInputs) -> None:
    """Refuse missing paths before any work, naming the option."""
    for field in fields(inputs):
        value = getattr(inputs, field.name)
        if isinstance(value, str | Path) and not Path(value).exists():
            flag = "--" + field.name.replace("_", "-")
            if field.name not in CHECKPOINTS or not is_hub_id(value):
                raise SettingsError(f"{flag}: {value} does not exist")
            try:
                resolve_checkpoint(value)
            except CheckpointError as error:
                raise SettingsError(f"{flag}: {error}") from None
    if inputs.harmful is None and inputs.task is None:
        raise SettingsError("give --harmful and --task (the sets every model is scored on)")


def check_checkpoints(inputs: CompareInputs) -> None:
    """Refuse checkpoints that cannot be read or combined (headers only) before any work."""
    aligned = Checkpoint.open(inputs.aligned)
    for model in (inputs.finetuned, inputs.unaligned, inputs.safety, inputs.harmful_model):
        if model is not None:
            base = aligned if is_adapter(model) else None
            validate_checkpoints(aligned, Checkpoint.open(model, base=base))
