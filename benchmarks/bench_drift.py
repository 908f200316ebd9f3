"""Drift on the labs: how far recover's output and interpolation halfway toward A moved from
the fine-tune B, as ``compare --utility drift`` reports it (issue 23 item 1).

For each lab size and harmful fine-tune B (``ft_harmful``, ``ft_harmful_lora``), compare runs
``recover`` (its defaults and the demo's inputs) and ``interpolate:alpha=0.5`` and scores every
row with the lab's evaluator on the held-out sets, drift from B on ``benign_eval`` included
(16 reply tokens, B's greedy replies). Acceptance: interpolation drifts further than recover.

Run (one thread per process on a shared CPU):
    OMP_NUM_THREADS=1 python benchmarks/bench_drift.py --size test default

Prints a table per lab and fine-tune; writes benchmarks/results/drift_<size>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

from safealign import __version__
from safealign.compare import CompareSettings, compare
from safealign.lab import build
from safealign.lab.compare import BATCH_SIZE, lab_inputs
from safealign.report import markdown_table, write_json
from safealign.runtime import versions

RESULTS = Path(__file__).parent / "results"
METHODS = ("recover", "interpolate:alpha=0.5")
FINETUNES = ("ft_harmful", "ft_harmful_lora")
KEYS = ("harmful_rate", "utility", "over_refusal", "drift")


def measure(size: str, finetuned: str, work: Path) -> dict:
    """compare on one lab and fine-tune, drift as its utility: every row's scores."""
    lab = build(size=size)
    inputs = dataclasses.replace(lab_inputs(lab, finetuned), unaligned=None)
    settings = CompareSettings(methods=METHODS, batch_size=BATCH_SIZE, utility="drift")
    start = time.perf_counter()
    result = compare(inputs, settings, work / f"{size}-{finetuned}")
    rows = []
    for row in result.rows:
        scores = {key: (row.scores or {}).get(key) for key in KEYS}
        rows.append({"name": row.name, "status": row.status, "reason": row.reason, **scores})
    drifts = {row["name"]: (row["drift"] or {}).get("value") for row in rows}
    recovered, interpolated = drifts.get("recover"), drifts.get("interpolate:alpha=0.5")
    return {
        "size": size,
        "lab": lab.root.name,
        "finetuned": finetuned,
        "rows": rows,
        "recommendation": result.recommendation["text"],
        "interpolation_drifts_further": None
        if recovered is None or interpolated is None
        else interpolated > recovered,
        "seconds": round(time.perf_counter() - start, 1),
    }


def shown(rows: list[dict]) -> list[dict]:
    """Rows for the printed table: each score's value, drift with its interval."""
    table = []
    for row in rows:
        cells = {"name": row["name"], "status": row["status"]}
        for key in KEYS:
            entry = row[key] or {}
            cells[key] = entry.get("value")
        interval = (row["drift"] or {}).get("ci95")
        cells["drift 95% CI"] = f"{interval[0]:.4f}-{interval[1]:.4f}" if interval else "-"
        table.append(cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["test"], choices=["test", "default"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size:
            runs = []
            for finetuned in FINETUNES:
                run = measure(size, finetuned, Path(tmp))
                runs.append(run)
                print(f"\n## lab {size} ({run['lab']}), B = {finetuned}, {run['seconds']} s\n")
                print(markdown_table(shown(run["rows"])))
                print(f"\ninterpolation drifts further: {run['interpolation_drifts_further']}")
            write_json(
                RESULTS / f"drift_{size}.json",
                {
                    "runs": runs,
                    "methods": METHODS,
                    "safealign": __version__,
                    "versions": versions(),
                    "platform": platform.platform(),
                },
            )


if __name__ == "__main__":
    main()
