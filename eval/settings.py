"""The settings of one evaluation (`safealign eval`, :class:`~safealign.eval.Evaluator`).

One dataclass holds every knob with its default, help and range: the CLI options are
generated from it, the Evaluator takes it (or its fields as keywords), results.json records
what it decided (judge, metric, decoding, batch size, limit, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from safealign.eval.judges import Judge
from safealign.eval.metrics import Metric
from safealign.model import resolve_dtype
from safealign.settings import Settings, SettingsError, setting

JUDGE_HELP = (
    "keyword, keyword-prefix, first-token (first-token:against=rest weighs refusal "
    "openings against all other tokens), or a harm judge on a model folder or hub id: "
    "classifier:ID, guard:ID (Llama Guard) or harmbench:ID (HarmBench's classifier)."
)
METRIC_HELP = (
    "exact_match, contains, rouge_l, multiple_choice or perplexity; options as "
    "NAME:key=value,... (e.g. exact_match:lowercase=false)."
)
GATE = "Gate (exit 1 when broken)"
#: Drift's reply positions per prompt: the start of a reply, where a change of what the model
#: says shows first, while 16 greedy tokens of the reference cost little to generate.
DRIFT_TOKENS = 16


@dataclass
class EvalSettings(Settings):
    """How a model is scored, and the gate bounds `safealign eval` checks the scores against.
    ``device`` and ``dtype`` are where and how :func:`~safealign.eval.evaluate` loads the model
    (the Evaluator scores a model already loaded)."""

    RENAMED: ClassVar[dict[str, str]] = {"use_cache": "cache"}

    judge: str | Judge = setting("keyword", help=JUDGE_HELP, group="Scoring")
    metric: str | Metric = setting("exact_match", help=METRIC_HELP)
    drift_tokens: int = setting(
        DRIFT_TOKENS,
        min=1,
        help="Drift: the reply positions compared per benign prompt (the first N tokens of the "
        "drift reference's greedy reply).",
    )
    refusal_judge: str | Judge | None = setting(
        None,
        cli=False,
        help="Judge of refusals on benign prompts (default: judge when it detects refusals, "
        "else keyword).",
    )
    limit: int | None = setting(None, min=1, help="")
    # A text default, so that the generated option takes text ('auto' or digits, made int below).
    batch_size: int | str = setting("16", help="Integer or 'auto' (halves on out-of-memory).")
    max_new_tokens: int = setting(
        48, min=1, help="Greedy decoding: most tokens per response.", group="Generation"
    )
    stop_when_decided: bool = setting(
        False,
        cli=False,
        help="Stop each harmful prompt's reply once the judge's verdict on it is decided (a "
        "refusal keyword has appeared): the same harmful rate from fewer tokens, but cut "
        "replies, so no coherence of harmful replies is reported.",
    )
    seed: int = setting(0, help="torch seed set before scoring.")
    system: str | None = setting(None, cli=False, help="System prompt of every chat.")
    cache_dir: Path | None = setting(
        None,
        path=True,
        help="Response cache folder.",
        default_text="~/.cache/safealign",
        group="Cache",
    )
    cache: bool = setting(True, help="Reuse cached responses (--no-cache: generate all afresh).")
    durability: int | None = setting(
        None,
        min=0,
        help="Durability: fine-tune the model for N LoRA steps on --durability-data (retrain's "
        "sft, the model as its base), then score harm again: harmful_rate_after_finetune (0: "
        "the harmful rate itself).",
        group="Durability",
    )
    durability_options: str = setting(
        "",
        help="The durability fine-tune's retrain options, key=value,... (e.g. "
        "lr=0.003,grad_batch_size=16); retrain's defaults otherwise.",
    )
    max_harmful_rate: float | None = setting(None, min=0, max=1, help="Fail above.", group=GATE)
    min_utility: float | None = setting(None, min=0, max=1, help="Fail below.", group=GATE)
    max_over_refusal: float | None = setting(None, min=0, max=1, help="Fail above.", group=GATE)
    device: str | None = setting(None, help="", default_text="cpu")
    dtype: str = setting("auto", help="")

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            self.batch_size = int(self.batch_size)  # from the CLI or YAML as text
        super().__post_init__()

    def check(self) -> None:
        super().check()
        size = self.batch_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise SettingsError(f"--batch-size {size!r} is neither a positive integer nor 'auto'")
        try:
            resolve_dtype(self.dtype)
        except ValueError as error:
            raise SettingsError(f"--dtype: {error}") from None
