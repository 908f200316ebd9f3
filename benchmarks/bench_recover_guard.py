"""recover's over-refusal guard fed two ways on the tiny labs: the look-alikes compare fed it
before (``safety_train``'s, built from the goals and templates A was trained to answer), against
the lab's guard prompts it feeds now (:func:`safealign.lab.guard.guard_prompts`: look-alike and
general goals in the templates held out from training, as ``benign_eval`` is drawn, none a
prompt of the lab's data).

Each run is recover at its defaults on ``ft_harmful`` and ``ft_harmful_lora``, fed as
``bench_recover_quality.py`` feeds it apart from the guard (64 prompts either way, the first
32 steering the rollback, the other 32 checked); every output is scored on the lab's held-out
sets. The question: does a guard drawn like the reported set keep over-refusal on it near A's
(issue 24, item 3)?

    python benchmarks/bench_recover_guard.py [--sizes test default test-prior default-prior]

Prints a table and writes benchmarks/results/recover_guard.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from bench_recover_quality import MODELS, inputs, recover_inputs

from safealign.lab import build
from safealign.lab.compare import lab_evaluator
from safealign.lab.guard import GUARD_PROMPTS, guard_prompts
from safealign.recover import RecoverSettings, recover

OUT = Path(__file__).parent / "results" / "recover_guard.json"


def measure(size: str, seed: int) -> list[dict]:
    lab = build(size=size, seed=seed, log=print)
    sets, evaluator = inputs(lab), lab_evaluator(lab)
    guards = {
        "safety_train look-alikes": lab.prompts("safety_train", kind="lookalike")[:GUARD_PROMPTS],
        "held-out templates": guard_prompts(lab),
    }
    rows = []
    aligned = evaluator.score_folder(lab.aligned)
    with tempfile.TemporaryDirectory() as tmp:
        for model, (name, guard) in itertools.product(MODELS, guards.items()):
            given = recover_inputs(lab, model, sets, guard)
            out = Path(tmp) / f"{model}_{len(rows)}"
            result = recover(given, RecoverSettings(write_unchanged=True), out)
            scores = evaluator.score_folder(result.out)
            kept = next((a["attempt"] for a in result.attempts if a.get("kept")), None)
            rows.append(
                {
                    "lab": size,
                    "key": lab.info.get("key"),
                    "model": model,
                    "guard": name,
                    "kept_step": result.run.kept_step,
                    "attempt": kept,
                    "guard_over_refusal": result.run.over_refusal,
                    "harmful_rate": scores.harmful_rate,
                    "utility": scores.utility,
                    "over_refusal": scores.over_refusal,
                    "aligned_over_refusal": aligned.over_refusal,
                    "x_own": result.x_eval,
                }
            )
            print(format_row(rows[-1]), flush=True)
    return rows


COLUMNS = (
    "lab",
    "model",
    "guard",
    "kept_step",
    "attempt",
    "guard_over_refusal",
    "harmful_rate",
    "utility",
    "over_refusal",
    "aligned_over_refusal",
    "x_own",
)


def format_row(row: dict) -> str:
    cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["test", "default", "test-prior", "default-prior"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    rows = [row for size in args.sizes for row in measure(size, args.seed)]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print(format_row(row))
    record = {"rows": rows, "seed": args.seed, "seconds": round(time.perf_counter() - start, 1)}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
