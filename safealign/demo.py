"""The demo: ``compare`` on the lab, every method on its harmful LoRA fine-tune."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safealign.compare import CompareResult, CompareSettings, compare
from safealign.lab import build
from safealign.lab.cli import without_table
from safealign.lab.compare import BATCH_SIZE, RETRAIN_OPTIONS, lab_inputs
from safealign.lab.phenomenon import format_table

#: The methods the demo compares: each at its defaults, and the safety merges also at the
#: setting that traded best on the default lab (benchmarks/bench_safety_merge.py).
METHODS = (
    "recover",
    "safemerge",
    "safemerge:tau=0.5,weights=[0.2, 0.8]",
    "safe_lora",
    "safe_lora:tau=0.35",
    "csulora",
    "safetylock",
    "resta",
    "interpolate:alpha=0.5",
    "retrain:sft",
    "retrain:kl",
    "retrain:adaptive-kl",
    "retrain:der",
)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    size: str = "test",
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Build (or reuse) the lab, log its phenomenon table once, and compare every method on its
    harmful LoRA fine-tune; the report lands in ``out`` (report.md, report.json, tradeoff.png)."""
    log(f"demo: the {size} lab (built once, then cached)")
    lab = build(size=size, seed=seed, log=without_table(log))
    log(format_table(lab.info["table"], lab.info["checks"]))
    log(f"demo: comparing {len(methods)} methods on the lab's harmful LoRA fine-tune")
    settings = CompareSettings(
        methods=methods, batch_size=BATCH_SIZE, retrain_options=RETRAIN_OPTIONS, overwrite=True
    )
    return compare(lab_inputs(lab), settings, out, log)
