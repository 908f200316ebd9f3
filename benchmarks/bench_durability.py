"""Which repairs last: the harmful rate of every method's output after STEPS LoRA steps of
benign fine-tuning (issue 23 item 3, durability).

On one lab (``--size``, default ``default``) and its harmful LoRA fine-tune, compare runs every
method of its default list (recover, each merge, each retrain regularizer; the lab's inputs and
retrain schedule, as the demo runs them) into ``--work`` (or reuse ``--compare-dir``, a finished
compare run: its rows' outputs are read, nothing is rerun). Then each input model and each
method's output is fine-tuned for STEPS in ``--steps`` (default 0 50 200) LoRA steps of
retrain's ``sft`` on the lab's benign task data (``task_train``, the output as the base) and its
harmful rate scored on ``harmful_eval`` by the lab's evaluator (``safealign eval --durability``).
STEPS 0 is the harmful rate itself. Partial results are saved after each model; a rerun skips
the (model, STEPS) pairs already in the JSON.

Run (one thread per process on a shared CPU):
    OMP_NUM_THREADS=2 python benchmarks/bench_durability.py --size default
    python benchmarks/bench_durability.py --size test --steps 0 2 --methods recover,interpolate

Prints a table; writes benchmarks/results/durability_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import safealign.retrain  # noqa: F401 - registers the durability fine-tuner
from safealign import __version__
from safealign.compare import CompareSettings, compare
from safealign.compare.run import score_checkpoint
from safealign.eval import Evaluator
from safealign.lab import build
from safealign.lab.compare import BATCH_SIZE, RETRAIN_OPTIONS, lab_inputs
from safealign.report import markdown_table, write_json
from safealign.runtime import versions

RESULTS = Path(__file__).parent / "results"
STEPS = (0, 50, 200)
#: The benign fine-tune's schedule: the lab's LoRA fine-tune's batch and learning rate
#: (``RETRAIN_OPTIONS`` without its epochs: durability sets the steps).
OPTIONS = ",".join(o for o in RETRAIN_OPTIONS.split(",") if not o.startswith("epochs="))
KEY = "harmful_rate_after_finetune"


def compare_rows(size: str, finetuned: str, work: Path, methods: tuple[str, ...]) -> list[dict]:
    """Every scored row of compare on the lab (resumed in ``work`` when it ran before)."""
    lab = build(size=size)
    settings = CompareSettings(
        methods=methods,
        batch_size=BATCH_SIZE,
        retrain_options=RETRAIN_OPTIONS,
        resume=True,
    )
    result = compare(lab_inputs(lab, finetuned), settings, work, print)
    return [row.__dict__ for row in result.rows]


def stored_rows(compare_dir: Path) -> list[dict]:
    """The rows of a finished compare run (its report.json)."""
    return json.loads((compare_dir / "report.json").read_text())["rows"]


def measure(row: dict, steps: int, lab, options: str) -> dict:
    """The harmful rate of ``row``'s model after ``steps`` of benign fine-tuning."""
    evaluator = Evaluator(
        harmful=lab.data("harmful_eval"),
        batch_size=BATCH_SIZE,
        durability=steps,
        durability_data=lab.data("task_train"),
        durability_options=options,
    )
    start = time.perf_counter()
    scores = score_checkpoint(evaluator, Path(row["out"]), lab.aligned).to_dict()
    return {
        "harmful_rate": scores["harmful_rate"],
        KEY: scores[KEY],
        "durability": scores["durability"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(results: dict) -> str:
    """One row per model: its harmful rate after each STEPS, with the 95% interval."""
    rows = []
    for name, by_steps in results["models"].items():
        cells = {"name": name}
        for steps in results["steps"]:
            entry = (by_steps.get(str(steps)) or {}).get(KEY) or {}
            value, ci = entry.get("value"), entry.get("ci95")
            cells[f"after {steps}"] = (
                "-" if value is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
            )
        rows.append(cells)
    return markdown_table(rows, ["name", *(f"after {s}" for s in results["steps"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["test", "default"])
    parser.add_argument("--finetuned", default="ft_harmful_lora")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--methods", default="", help="compare's methods (default: its list)")
    parser.add_argument("--options", default=OPTIONS, help="the fine-tune's retrain options")
    parser.add_argument("--compare-dir", type=Path, help="reuse this finished compare run")
    parser.add_argument("--work", type=Path, help="compare's folder (default: /tmp/...)")
    parser.add_argument("--out", type=Path, help="JSON path (default: results/durability_SIZE)")
    args = parser.parse_args()
    lab = build(size=args.size)
    out = args.out or RESULTS / f"durability_{args.size}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"models": {}}
    for key, value in (
        ("size", args.size),
        ("finetuned", args.finetuned),
        ("options", args.options),
    ):
        if results.get(key, value) != value:  # a rerun skips what the file holds: same setting
            raise SystemExit(f"{out} holds figures for {key} {results[key]!r}: give another --out")
    results.update(
        size=args.size,
        lab=lab.root.name,
        finetuned=args.finetuned,
        steps=args.steps,
        options=args.options,
        data="task_train",
        harmful="harmful_eval",
        version=__version__,
        versions=versions(),
        machine=platform.platform(),
    )
    work = args.compare_dir or args.work or Path(f"/tmp/safealign-bench-durability-{args.size}")
    if args.compare_dir is not None:
        rows = stored_rows(args.compare_dir)
    else:
        methods = tuple(m for m in args.methods.split(",") if m)
        rows = compare_rows(args.size, args.finetuned, work, methods)
    results["compare_dir"] = str(work)
    for row in rows:
        if row["status"] != "done" or not row.get("out"):
            results["models"][row["name"]] = {"status": row["status"], "reason": row["reason"]}
            continue
        done = results["models"].setdefault(row["name"], {})
        for steps in args.steps:
            if str(steps) in done:
                continue
            print(f"{row['name']}: {steps} steps", flush=True)
            done[str(steps)] = measure(row, steps, lab, args.options)
            write_json(out, results)  # partial results after each model and STEPS
    write_json(out, results)
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
