"""The demo: the lab's phenomenon, then recovery and safety-aware merging, scored side by side."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from safealign.data import load_prompts, load_task
from safealign.eval import Evaluator, Scores
from safealign.lab import Lab, build
from safealign.lab.phenomenon import format_table
from safealign.merge import METHODS, MergeConfig, run_merge, safety_config
from safealign.recover import recover
from safealign.recover.report import sweep_table
from safealign.report import markdown_table, tradeoff_plot, write_json

COLUMNS = ("name", "method", "harmful_rate", "utility", "over_refusal", "seconds")
#: Task examples given to ``recover`` for rollback: a slice of the fine-tune's task data,
#: kept apart from ``task_eval``, on which every row is scored.
ROLLBACK_EXAMPLES = 64
#: Harmful training prompts that define the harmful direction.
DIRECTION_PROMPTS = 128
#: Benign look-alike prompts (from the safety data, apart from ``benign_eval``) whose
#: over-refusal ``recover`` checks with utility: on the default lab's LoRA fine-tune,
#: restoring without this guard ends with 95% over-refusal.
GUARD_PROMPTS = 64
#: Extra rates ``recover`` runs for its trade-off curve (the main run uses the default).
SWEEP = (0.001, 0.005)
#: The safety merges the demo runs on ``ft_harmful_lora``: each method's defaults, and the
#: setting that traded best on the default lab (benchmarks/bench_safety_merge.py).
MERGES = (
    ("safemerge", {}),
    ("safemerge", {"tau": 0.5, "weights": [0.2, 0.8]}),
    ("safe_lora", {}),
    ("safe_lora", {"tau": 0.35}),
)


def lab_evaluator(lab: Lab) -> Evaluator:
    """The shared evaluator on the lab's held-out sets."""
    return Evaluator(
        harmful=lab.data("harmful_eval"),
        task=lab.data("task_eval"),
        benign=lab.data("benign_eval"),
        judge="keyword",
        metric="exact_match",
        batch_size=64,
    )


def lab_safety_config(lab: Lab, method: str, parameters: dict | None = None) -> MergeConfig:
    """A safety merge of the lab's LoRA fine-tune, given the lab's models for the roles
    ``method`` takes (``unaligned``, ``safety``)."""
    roles = METHODS.get(method).required_roles + METHODS.get(method).optional_roles
    return safety_config(
        method,
        aligned=lab.aligned,
        finetuned=lab.ft_harmful_lora,
        unaligned=lab.unaligned if "unaligned" in roles else None,
        safety=lab.safety_lora if "safety" in roles else None,
        parameters=parameters,
    )


def score_output(evaluator: Evaluator, folder: Path, aligned: Path) -> Scores:
    """Score a model folder, or an adapter folder on the aligned model."""
    if (Path(folder) / "adapter_config.json").exists():
        return evaluator.score_folder(aligned, adapter=folder)
    return evaluator.score_folder(folder)


def row(name: str, method: str, scores: Scores, seconds: float) -> dict:
    """One line of the demo table."""
    return {
        "name": name,
        "method": method,
        "harmful_rate": scores.harmful_rate,
        "utility": scores.utility,
        "over_refusal": scores.over_refusal,
        "seconds": round(seconds, 1),
    }


def run_demo(
    out: str | Path = "runs/demo",
    *,
    size: str = "test",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Build the lab, repair its harmful fine-tunes (recover; safety merges), score every model.

    Writes ``demo.json``, ``demo.md`` and ``tradeoff.png`` into ``out`` (with the repaired
    models in sub-folders) and returns the table's rows.
    """
    out = Path(out)
    lab = build(size=size, seed=seed, log=log)
    log(format_table(lab.info["table"], lab.info["checks"]))
    evaluator = lab_evaluator(lab)
    rollback_task = load_task(lab.data("task_train")).examples[:ROLLBACK_EXAMPLES]
    direction_prompts = load_prompts(lab.data("harmful_train")).prompts[:DIRECTION_PROMPTS]
    guard_prompts = lab.prompts("safety_train", kind="lookalike")[:GUARD_PROMPTS]

    rows = []
    for name, folder, adapter in (
        ("aligned", lab.aligned, None),
        ("ft_harmful", lab.ft_harmful, None),
        ("ft_harmful_lora", lab.aligned, lab.ft_harmful_lora),
    ):
        scores = evaluator.score_folder(folder, adapter=adapter)
        rows.append(row(name, "input", scores, scores.seconds))

    sweeps = {}
    for finetuned in ("ft_harmful", "ft_harmful_lora"):
        log(f"recover: {finetuned}")
        start = time.perf_counter()
        result = recover(
            lab.aligned,
            lab.model(finetuned),
            out / f"recover_{finetuned}",
            harmful=direction_prompts,
            eval_harmful=lab.data("harmful_eval"),
            task=rollback_task,
            benign=guard_prompts,
            sweep=SWEEP,
            overwrite=True,
            progress=False,
        )
        seconds = time.perf_counter() - start
        sweeps[finetuned] = result.sweep
        log(sweep_table(result))
        scores = evaluator.score_folder(result.out)
        rows.append(row(f"recover({finetuned})", "recover", scores, seconds))

    for method, parameters in MERGES:
        label = ",".join(f"{k}={v}" for k, v in parameters.items()) or "defaults"
        log(f"merge: {method} ({label}) on ft_harmful_lora")
        start = time.perf_counter()
        config = lab_safety_config(lab, method, parameters)
        slug = re.sub(r"[^\w.]+", "-", label).strip("-")
        folder = out / f"{method}_{slug}"
        result = run_merge(config, folder, overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        scores = score_output(evaluator, result.out, lab.aligned)
        rows.append(row(f"{method}(ft_harmful_lora; {label})", "merge", scores, seconds))

    table = markdown_table(rows, COLUMNS)
    write_json(
        out / "demo.json",
        {"lab": str(lab.root), "size": size, "seed": seed, "rows": rows, "recover_sweeps": sweeps},
    )
    (out / "demo.md").write_text(table + "\n")
    plot = tradeoff_plot(rows, out / "tradeoff.png")
    log(table)
    log(f"written: {out / 'demo.json'}" + (f", {plot}" if plot else ""))
    return rows
