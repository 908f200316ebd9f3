"""What a merge records: ``merge_report.json``, the model card, the per-layer table."""

from __future__ import annotations

import math
from pathlib import Path

from safealign.checkpoint import ModelCard
from safealign.merge.methods import LayerScore
from safealign.merge.plan import MergePlan, tensor_params
from safealign.report import markdown_table

REPORT_NAME = "merge_report.json"


def merge_report(plan: MergePlan, scores: list[LayerScore], selected: set[str]) -> dict:
    """The report (``seconds`` is added when the merge ends)."""
    rows = []
    for s in scores:
        row = s.to_dict()
        row["rho"] = None if math.isnan(s.rho) else s.rho
        row["selected"] = s.name in selected
        rows.append(row)
    return {
        "method": plan.method.name,
        "output": plan.output,
        "seed": plan.settings.seed,
        "config": plan.config.to_dict(),
        "parameters": tensor_params(plan, "").global_,
        "layers_scored": len(scores),
        "layers_selected": len(selected),
        "layers": rows,
    }


def model_card(plan: MergePlan, report: dict, out: Path) -> ModelCard:
    """The README.md of the output: method, config, seed, inputs, layers selected."""
    inputs = {model_id: ckpt.name for model_id, ckpt in plan.inputs.items()}
    results = None
    if report["layers_scored"]:
        results = {
            "layers scored": report["layers_scored"],
            "layers selected": report["layers_selected"],
        }
    settings = {"merge config": plan.config.to_dict(), "seed": report["seed"]}
    return ModelCard(
        title=out.name,
        method=f"merge/{plan.method.name}",
        summary=f"Merged with safealign `{plan.method.name}`: {plan.method.summary}.",
        settings=settings,
        inputs=inputs,
        results=results,
    )


def layer_table(report: dict) -> str:
    """The per-layer table (ρ, norms, selected) as markdown."""
    columns = ["name", "rho", "norm_v", "norm_update", "norm_projected", "selected"]
    return markdown_table(report["layers"], columns)


def summary(report: dict, show: int = 5) -> str:
    """One screen: the method, layers selected of scored, the lowest-ρ layers (the full table
    is the report's ``layers``)."""
    lines = [f"{report['method']}: output {report['output']}, seed {report['seed']}"]
    if report["layers_scored"]:
        lines.append(f"{report['layers_selected']}/{report['layers_scored']} layers selected")
        scored = [row for row in report["layers"] if row["rho"] is not None]
        lowest = sorted(scored, key=lambda row: row["rho"])[:show]
        for row in lowest:
            mark = "selected" if row["selected"] else "kept"
            lines.append(f"  rho {row['rho']:+.3f}  {mark:<8}  {row['name']}")
        if len(report["layers"]) > show:
            lines.append(f"  ... {len(report['layers']) - show} more layers in {REPORT_NAME}")
    return "\n".join(lines)
