"""The cost of the post-hoc repairs (issue 26): ``csulora`` and ``safetylock`` on a lab's
fine-tune, each timed end to end as ``compare`` runs it (its inputs read, its directions or
subspaces found, its output written), against one evaluation of B on the lab's evaluation sets
(no response cache), all in one run. Goal: each at most 2x one evaluation.

Run (one heavy job at a time on a shared CPU):
    python benchmarks/bench_posthoc_cost.py --size smollm2 --finetuned ft_harmful_lora

Prints a table; writes benchmarks/results/posthoc_cost_<size>_<finetuned>.json.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from safealign import __version__
from safealign.compare import CompareSettings, compare
from safealign.compare.run import score_checkpoint
from safealign.lab import build
from safealign.lab.compare import lab_evaluator, lab_inputs
from safealign.report import markdown_table, write_json
from safealign.runtime import versions

RESULTS = Path(__file__).parent / "results"
METHODS = ("csulora", "safetylock")
#: The real-model lab's scoring (bench_real.py): generation batch and reply length.
BATCH_SIZE, MAX_NEW_TOKENS = 64, 24


def evaluation_seconds(lab, finetuned: str) -> float:
    """Wall time of one uncached evaluation of B on the lab's evaluation sets."""
    evaluator = lab_evaluator(
        lab, batch_size=BATCH_SIZE, max_new_tokens=MAX_NEW_TOKENS, cache=False
    )
    start = time.perf_counter()
    score_checkpoint(evaluator, lab.root / finetuned, lab.aligned)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="smollm2", choices=["test", "default", "smollm2"])
    parser.add_argument("--finetuned", default="ft_harmful_lora")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lab = build(size=args.size)
    evaluation = evaluation_seconds(lab, args.finetuned)
    print(f"one evaluation of {args.finetuned}: {evaluation:.1f} s", flush=True)
    settings = CompareSettings(
        methods=METHODS, batch_size=BATCH_SIZE, max_new_tokens=MAX_NEW_TOKENS
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(lab_inputs(lab, args.finetuned), settings, Path(tmp) / "cmp", print)
    rows = [
        {
            "method": row.name,
            "status": row.status,
            "seconds": row.seconds,
            "x_eval": None if row.seconds is None else round(row.seconds / evaluation, 2),
        }
        for row in result.rows
        if row.kind != "input"
    ]
    print(markdown_table(rows))
    write_json(
        args.out or RESULTS / f"posthoc_cost_{args.size}_{args.finetuned}.json",
        {
            "size": args.size,
            "lab": lab.root.name,
            "finetuned": args.finetuned,
            "evaluation_seconds": round(evaluation, 2),
            "rows": rows,
            "machine": {"platform": platform.platform(), "safealign": __version__, **versions()},
        },
    )


if __name__ == "__main__":
    main()
