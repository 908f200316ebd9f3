"""Every recover setting, once: default, help and range. The CLI options, the Python API, the
plan, report.json and the model card all read :class:`RecoverSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from safealign.model import resolve_dtype
from safealign.settings import Settings, SettingsError, setting

#: ``--max-cost`` under ``adaptive``: the issue's cost goal, in evaluations of B (README "Recover")
ADAPTIVE_MAX_COST = 8.0

#: ``--step-prompts`` of adaptive's first attempt: a step's gradient on a quarter of the lab's
#: 128 direction prompts (README "Recover schedules", chosen on five labs' training-side sets)
ADAPTIVE_STEP_PROMPTS = 32

#: ``--utility drift``'s default bound (nats): see README "Recover", chosen on validation splits.
DRIFT_MAX = 0.1


@dataclass
class RecoverSettings(Settings):
    """Settings of one recovery run. ``layer``, ``warmup``, ``dtype`` and ``device`` left at
    ``None`` are resolved from the model once it is opened; the report records the values
    used."""

    RENAMED: ClassVar[dict[str, str]] = {"eval_batch_size": "batch_size"}

    layer: int | None = setting(
        None,
        help="Direction layer L.",
        min=1,
        default_text="floor(4n/6); n under 12 layers",
        group="Method",
    )
    schedule: str = setting(
        "adaptive",
        help="Rollback schedule: adaptive (paper with --step-prompts windows, then guarded, "
        "then guarded at half the rate with half of a failing step rolled back, until one "
        "repairs), paper (the authors' "
        "loop: one check after the warm-up, then a restart with rollback every step) or "
        "guarded (every step checked).",
        choices=("adaptive", "paper", "guarded"),
    )
    rate: float = setting(
        0.002, help="Share restored per step.", min=0, max=1, min_open=True, max_open=True
    )
    steps: int = setting(20, help="Restoration steps, each restoring --rate.", min=1)
    warmup: int | None = setting(
        None,
        help="Warm-up steps: the first step checked.",
        min=0,
        default_text="5; guarded: 1 under 12 layers",
    )
    harmful_margin: float = setting(
        0.1,
        help="A kept state repairs when its harmful rate is at most A's plus this; adaptive "
        "tries its next attempt until one does, and a run that ends above it exits 1.",
        min=0,
        max=1,
    )
    max_minutes: float | None = setting(
        None,
        help="No step, and under adaptive no attempt, starts after this many minutes; the "
        "state kept is the best held by then.",
        min=0,
        min_open=True,
        default_text="no limit",
    )
    max_cost: float | None = setting(
        None,
        help="No step or attempt starts once the run has taken this many times one evaluation "
        "of B (timed when the guard scores B), less the one evaluation kept for scoring the "
        "result; under adaptive it bounds the attempts after the first only. 0: no limit.",
        min=0,
        default_text=f"{ADAPTIVE_MAX_COST:g} under adaptive; paper and guarded: no limit",
    )
    check_every: int = setting(
        5, help="paper: steps between checkpoints, each checked for utility.", min=1
    )
    metric_drop: float = setting(
        0.05,
        help="Allowed relative utility drop.",
        min=0,
        max=1,
        max_open=True,
        group="Utility check",
    )
    rollback_rate: float = setting(
        0.2,
        help="Share of a step rolled back (paper: of its elements a fresh task gradient "
        "moves toward the fine-tuned values; guarded: of all its restores).",
        min=0,
        max=1,
    )
    utility: str = setting(
        "task",
        help="What the check holds: task (utility on --task, within --metric-drop of B's) or "
        "drift:max=X (mean KL from B on the checked --benign prompts at most X nats; "
        f"drift alone: max={DRIFT_MAX:g}), which needs no labelled task data.",
    )
    refusal_rise: float = setting(
        0.05,
        help="Allowed over-refusal rise above max(A, B), with --benign.",
        min=0,
        max=1,
        max_open=True,
    )
    judge: str = setting(
        "keyword", help="Harmful-response judge, NAME:key=value,... as eval's.", group="Scoring"
    )
    metric: str = setting("exact_match", help="Task metric, NAME:key=value,... as eval's.")
    device: str | None = setting(None, help="", default_text="cpu")
    dtype: str | None = setting(
        None, help="Working and output dtype.", default_text="the fine-tuned checkpoint's"
    )
    grad_batch_size: int = setting(8, help="Harmful prompts per batch.", min=1)
    max_prompts: int | None = setting(
        256, help="Harmful prompts the direction and gradient use.", min=1, group="Method"
    )
    step_prompts: int | None = setting(
        None,
        help="Harmful prompts each step's gradient takes: the direction prompts split into "
        "windows of about this many, taken in turn (0: all of them every step, as the "
        "authors' loop).",
        min=0,
        default_text=f"{ADAPTIVE_STEP_PROMPTS} in adaptive's first attempt; else 0",
        group="Method",
    )
    limit: int | None = setting(None, min=1, help="")
    sweep: tuple[float, ...] = setting(
        (),
        help="Rates for the trade-off curve, e.g. 0.001,0.002,0.004 (adaptive: each rate "
        "runs its first attempt, paper).",
        min=0,
        max=1,
        min_open=True,
        max_open=True,
    )
    batch_size: int = setting(16, help="Replies generated together when scoring.", min=1)
    max_new_tokens: int = setting(48, help="Tokens generated per scored reply.", min=1)
    write_unchanged: bool = setting(
        False,
        help="Write the output even when no repair held (it is then the fine-tuned model, "
        "and its card says so); the exit status is 1 either way.",
        group="Output",
    )
    overwrite: bool = setting(False, help="Replace a non-empty --out folder.")
    dry_run: bool = setting(
        False, help="Print the plan from the checkpoints' headers; read no weight."
    )
    out_shard_size: int | str = setting("2GB", help="Largest output shard.")

    def check(self) -> None:
        super().check()
        _ = self.drift_max  # a malformed --utility is refused with the other settings
        if isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            return  # a torch dtype's own name, as recorded once resolved (e.g. float64)
        try:
            resolve_dtype(self.dtype)
        except ValueError as error:
            raise SettingsError(f"--dtype: {error}") from None

    @property
    def drift_max(self) -> float | None:
        """The drift bound of ``--utility drift[:max=X]``; None under ``task``."""
        name, _, rest = self.utility.partition(":")
        if name == "task" and not rest:
            return None
        if name != "drift":
            raise SettingsError(f"--utility: {self.utility!r} is not task or drift[:max=X]")
        if not rest:
            return DRIFT_MAX
        key, _, value = rest.partition("=")
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if key.strip() != "max" or not bound > 0:
            raise SettingsError(f"--utility: {self.utility!r}: give drift:max=X with X > 0 nats")
        return bound
