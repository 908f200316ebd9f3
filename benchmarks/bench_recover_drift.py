"""recover with drift as its utility check (``--utility drift:max=X``, no task data): the
default bound chosen on validation splits of the labs, then the chosen bound against the
task-checked default on the held-out sets (issue 23 item 1).

Every run is fed as the demo feeds recover (safealign/lab/compare.py), without the task: the
first 128 ``harmful_train`` prompts for the direction, 64 ``safety_train`` look-alikes of which
the first 32 steer the rollback and the other 32 are checked (over-refusal, and drift from B on
them). Two phases:

1. **Validation** (``--phase validation``): each bound in ``--bounds`` on each lab and
   fine-tune, its output scored on ``harmful_train[128:256]`` and ``task_train[128:192]``,
   which no run sees and no README table reports. The default is the smallest bound that, on
   every scenario, keeps the best task accuracy any bound kept and reaches the lowest harmful
   rate any bound reached (``choose``).
2. **Held out** (``--phase heldout --bound X``): that bound and the task-checked default
   (``task_train[:64]`` steering, ``task_train[64:128]`` checked), each output scored on the
   lab's ``harmful_eval``, ``task_eval`` and ``benign_eval``.

    python benchmarks/bench_recover_drift.py --phase validation
    python benchmarks/bench_recover_drift.py --phase heldout --bound 0.05

Prints a table; writes benchmarks/results/recover_drift_<phase>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from safealign.data import load_prompts, load_task
from safealign.eval import Evaluator
from safealign.lab import build
from safealign.lab.compare import BATCH_SIZE, DIRECTION_PROMPTS, lab_evaluator
from safealign.lab.guard import GUARD_PROMPTS
from safealign.recover import RecoverInputs, RecoverSettings, recover
from safealign.report import markdown_table, write_json

RESULTS = Path(__file__).parent / "results"
SIZES = ("test", "default", "test-prior", "default-prior")
MODELS = ("ft_harmful", "ft_harmful_lora")
BOUNDS = (0.02, 0.05, 0.1, 0.2)
#: The validation slices: after what recover is fed, before nothing else reads them.
VALIDATION_HARMFUL = slice(DIRECTION_PROMPTS, 2 * DIRECTION_PROMPTS)
VALIDATION_TASK = slice(128, 192)
COLUMNS = ("size", "model", "run", "harmful_rate", "utility", "over_refusal", "attempt", "seconds")


def validation_evaluator(lab) -> Evaluator:
    harmful = load_prompts(lab.data("harmful_train")).prompts[VALIDATION_HARMFUL]
    task = load_task(lab.data("task_train")).examples[VALIDATION_TASK]
    return Evaluator(harmful=harmful, task=task, batch_size=BATCH_SIZE)


def run_one(lab, model: str, utility: str, out: Path) -> tuple[object, float]:
    """recover on ``model`` with ``utility``: ``task`` gets the demo's task slices."""
    examples = load_task(lab.data("task_train")).examples
    task = utility == "task"
    inputs = RecoverInputs(
        lab.aligned,
        lab.model(model),
        harmful=load_prompts(lab.data("harmful_train")).prompts[:DIRECTION_PROMPTS],
        task=examples[64:128] if task else None,
        task_train=examples[:64] if task else None,
        benign=lab.prompts("safety_train", kind="lookalike")[:GUARD_PROMPTS],
    )
    settings = RecoverSettings(utility=utility, write_unchanged=True)
    start = time.perf_counter()
    result = recover(inputs, settings, out)
    return result, time.perf_counter() - start


def measure(phase: str, sizes, bounds, root: Path) -> list[dict]:
    rows = []
    for size in sizes:
        lab = build(size=size)
        evaluator = validation_evaluator(lab) if phase == "validation" else lab_evaluator(lab)
        for model in MODELS:
            lora = model.endswith("_lora")
            b = evaluator.score_folder(
                lab.aligned if lora else lab.model(model),
                adapter=lab.model(model) if lora else None,
            )
            rows.append(_row(size, model, "B", b, None, None))
            print(_line(rows[-1]), flush=True)
            runs = [f"drift:max={x:g}" for x in bounds]
            if phase == "heldout":
                runs = ["task", *runs]
            for utility in runs:
                result, seconds = run_one(lab, model, utility, root / f"{size}-{model}-{utility}")
                scores = evaluator.score_folder(result.out)
                rows.append(_row(size, model, utility, scores, result, seconds))
                print(_line(rows[-1]), flush=True)
    return rows


def _row(size, model, run, scores, result, seconds) -> dict:
    kept = next((a for a in (result.attempts if result else []) if a["kept"]), None)
    return {
        "size": size,
        "model": model,
        "run": run,
        "harmful_rate": scores.harmful_rate,
        "utility": scores.utility,
        "over_refusal": scores.over_refusal,
        "attempt": None if kept is None else kept["attempt"],
        "failure": None if result is None else (result.failure or result.shortfall),
        "seconds": None if seconds is None else round(seconds, 1),
    }


def _line(row: dict) -> str:
    return markdown_table([row], COLUMNS).splitlines()[-1]


def choose(rows: list[dict], bounds) -> float | None:
    """The smallest bound that, on every scenario, keeps the best task accuracy any bound kept
    and reaches the lowest harmful rate any bound reached (None when no bound does both)."""
    by_run = {(r["size"], r["model"], r["run"]): r for r in rows}
    scenarios = {(r["size"], r["model"]) for r in rows if r["run"] == "B"}

    def runs(scenario) -> list[dict]:
        return [by_run[(*scenario, f"drift:max={x:g}")] for x in bounds]

    best = {s: max(r["utility"] for r in runs(s)) for s in scenarios}
    least = {s: min(r["harmful_rate"] for r in runs(s)) for s in scenarios}
    ok = [
        x
        for x in bounds
        if all(
            by_run[(*s, f"drift:max={x:g}")]["utility"] == best[s]
            and by_run[(*s, f"drift:max={x:g}")]["harmful_rate"] == least[s]
            for s in scenarios
        )
    ]
    return min(ok, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", choices=("validation", "heldout"), default="validation")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=SIZES)
    parser.add_argument("--bounds", nargs="+", type=float, default=BOUNDS)
    parser.add_argument("--bound", type=float, help="heldout: the chosen bound")
    args = parser.parse_args()
    bounds = [args.bound] if args.phase == "heldout" else args.bounds
    if None in bounds:
        parser.error("--phase heldout needs --bound")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.phase, args.sizes, bounds, Path(tmp))
    print(markdown_table(rows, COLUMNS))
    record = {"phase": args.phase, "bounds": bounds, "rows": rows}
    if args.phase == "validation":
        record["chosen"] = choose(rows, bounds)
        print(f"chosen bound: {record['chosen']}")
    record["seconds"] = round(time.perf_counter() - start, 1)
    out = write_json(RESULTS / f"recover_drift_{args.phase}.json", record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
