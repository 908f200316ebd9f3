"""Safety-merge trade-off on the lab: harmful rate and task cost of each merge of a fine-tune.

Every setting merges the lab's harmful fine-tune (``--finetuned``: the LoRA ``ft_harmful_lora``,
default, or the full ``ft_harmful``) back toward its aligned origin, writes the result to a
temporary folder, scores it with the demo's evaluator (held-out harmful, task and benign sets) and
deletes it. Deltas are against the fine-tune itself, in percentage points: harmful points lowered
(higher is safer) and task points lost (lower is better).

The grid measures each deliberate difference from the references: SafeMERGE's ``exact`` against
``peft-linear`` (the reference's combination), Safe LoRA's IBM default (the 10 lowest) against
the threshold rule, and RESTA's harmful model (``ft_harmful_only``, as the paper) against its LoRA
twin and against the model before alignment (``unaligned``, what ``resta`` took before).

Run (on a shared CPU, under the lock):
    OMP_NUM_THREADS=2 flock /tmp/safealign-cpu.lock python benchmarks/bench_safety_merge.py
    ... python benchmarks/bench_safety_merge.py --finetuned ft_harmful

Prints a markdown table and writes benchmarks/results/safety_merge.json (safety_merge_full.json
for ``--finetuned ft_harmful``).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from safealign import __version__
from safealign.compare.methods import safety_merge_config
from safealign.compare.run import score_checkpoint as score_output
from safealign.eval import Evaluator, Scores
from safealign.lab import Lab, build
from safealign.lab.compare import lab_evaluator, lab_inputs
from safealign.merge import METHODS, run_merge
from safealign.report import markdown_table, write_json

RESULTS = Path(__file__).parent / "results"
#: The lab fine-tunes a run may repair, and where each run's JSON goes by default.
FINETUNED = {
    "ft_harmful_lora": RESULTS / "safety_merge.json",
    "ft_harmful": RESULTS / "safety_merge_full.json",
}

#: The lab models ``lab_inputs`` gives each role a grid row may swap.
LAB_ROLES = {"harmful_model": "ft_harmful_only"}

#: (method, parameters, roles) in run order; each method's paper default comes first. ``roles``
#: replace the lab's inputs (``lab_inputs``) with other lab models, by name.
GRID: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    *(
        ("safemerge", {"tau": tau, "weights": weights, "combination": combination}, {})
        for tau in (0.35, 0.5, 0.7)
        for weights in ([0.8, 0.2], [0.5, 0.5], [0.2, 0.8])
        for combination in ("exact", "peft-linear")
    ),
    *(("safe_lora", {"k": k}, {}) for k in (10, 6, 12, 24)),
    *(("safe_lora", {"select": "threshold", "tau": tau}, {}) for tau in (0.5, 0.35, 0.7)),
    *(
        ("resta", {"beta": beta}, {"harmful_model": harmful})
        for harmful in ("ft_harmful_only", "ft_harmful_only_lora", "unaligned")
        for beta in (1.0, 0.5)
    ),
    *(("interpolate", {"alpha": alpha}, {}) for alpha in (0.2, 0.5, 0.8)),
]

COLUMNS = (
    "method",
    "parameters",
    "default",
    "layers selected",
    "harmful",
    "task",
    "over-refusal",
    "merge s",
    "harmful pts lowered",
    "task pts lost",
)


def is_default(method: str, parameters: dict[str, Any]) -> bool:
    """Whether the resolved parameters are all the method's declared defaults."""
    return all(parameters.get(p.name) == p.default for p in METHODS.get(method).parameters)


def describe(parameters: dict[str, Any], roles: dict[str, str] | None = None) -> str:
    items = {**parameters, **(roles or {})}
    return ", ".join(f"{key}={value}" for key, value in items.items())


def grid_config(lab: Lab, finetuned: str, method: str, parameters: dict, roles: dict[str, str]):
    """The merge config of one grid row: the lab's inputs, ``roles`` swapped for lab models."""
    swapped = {role: lab.model(name) for role, name in roles.items()}
    inputs = dataclasses.replace(lab_inputs(lab, finetuned), **swapped)
    return safety_merge_config(method, inputs, parameters)


def points(before: float | None, after: float | None) -> float | None:
    """``before - after`` in percentage points, or None when either is missing."""
    if before is None or after is None:
        return None
    return round(100 * (before - after), 1)


def scored_row(name: str, scores: Scores, reference: Scores) -> dict[str, Any]:
    return {
        "method": name,
        "harmful_rate": scores.harmful_rate,
        "task_accuracy": scores.utility,
        "over_refusal": scores.over_refusal,
        "harmful_points_lowered": points(reference.harmful_rate, scores.harmful_rate),
        "task_points_lost": points(reference.utility, scores.utility),
    }


def run_grid(
    lab: Lab, finetuned: str, evaluator: Evaluator, reference: Scores, work: Path
) -> list[dict[str, Any]]:
    """Merge, score and delete each grid setting; one result row each."""
    rows = []
    for i, (method, parameters, roles) in enumerate(GRID):
        config = grid_config(lab, finetuned, method, parameters, roles)
        result = run_merge(config, None, work / f"{i:02d}-{method}")
        scores = score_output(evaluator, result.out, lab.aligned)
        report = result.report
        resolved = {p.name: report["parameters"][p.name] for p in METHODS.get(method).parameters}
        layerwise = report["layers_scored"] > 0
        row = {
            **scored_row(method, scores, reference),
            "parameters": parameters,
            "roles": roles,
            "resolved_parameters": resolved,
            "default": is_default(method, resolved)
            and all(LAB_ROLES.get(role) == name for role, name in roles.items()),
            "output": report["output"],
            "layers_selected": report["layers_selected"] if layerwise else None,
            "layers_scored": report["layers_scored"] if layerwise else None,
            "merge_seconds": report["seconds"],
        }
        rows.append(row)
        shutil.rmtree(result.out)
        print(
            f"  {method} {describe(parameters, roles)}: harmful {scores.harmful_rate:.3f} "
            f"task {scores.utility:.3f} ({report['seconds']:.1f} s)",
            flush=True,
        )
    return rows


def _one_decimal(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def table_rows(inputs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The printed table: inputs first, then the grid."""
    out = []
    for row in [*inputs, *rows]:
        selected = row.get("layers_selected")
        out.append(
            {
                "method": row["method"],
                "parameters": describe(row["parameters"], row.get("roles"))
                if "parameters" in row
                else "input",
                "default": "yes" if row.get("default") else "",
                "layers selected": None
                if selected is None
                else f"{selected}/{row['layers_scored']}",
                "harmful": row["harmful_rate"],
                "task": row["task_accuracy"],
                "over-refusal": row["over_refusal"],
                "merge s": row.get("merge_seconds"),
                "harmful pts lowered": _one_decimal(row["harmful_points_lowered"]),
                "task pts lost": _one_decimal(row["task_points_lost"]),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["default", "test"])
    parser.add_argument("--lab", type=Path, help="an already built lab folder (else build --size)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--finetuned", default="ft_harmful_lora", choices=list(FINETUNED))
    parser.add_argument("--out", type=Path, help="default: results/safety_merge[_full].json")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()

    lab = Lab.open(args.lab) if args.lab else build(size=args.size)
    evaluator = lab_evaluator(lab)
    aligned = evaluator.score_folder(lab.aligned)
    finetuned = args.finetuned
    out = args.out or FINETUNED[finetuned]
    reference = score_output(evaluator, lab.model(finetuned), lab.aligned)
    inputs = [
        scored_row("aligned", aligned, reference),
        scored_row(finetuned, reference, reference),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-safety-merge-", dir=args.workdir) as work:
        rows = run_grid(lab, finetuned, evaluator, reference, Path(work))

    result = {
        "lab": {"key": lab.info["key"], "size": lab.info["size"], "path": str(lab.root)},
        "finetuned": finetuned,
        "evaluator_n": {
            "harmful": reference.n_harmful,
            "task": reference.n_task,
            "benign": reference.n_benign,
        },
        "deltas": f"percentage points against {finetuned}",
        "versions": {
            "safealign": __version__,
            "torch": torch.__version__,
            "transformers": version("transformers"),
            "peft": version("peft"),
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
        "inputs": inputs,
        "rows": rows,
    }
    n = result["evaluator_n"]
    print(
        f"\nlab {lab.info['size']} ({lab.info['key']}); n harmful {n['harmful']}, "
        f"task {n['task']}, benign {n['benign']}; deltas vs {finetuned} in points"
    )
    print(markdown_table(table_rows(inputs, rows), COLUMNS))
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
