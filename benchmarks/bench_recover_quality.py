"""safealign recover: the ``adaptive`` (default), ``paper`` and ``guarded`` schedules side by
side on the lab.

Each schedule repairs the lab's ``ft_harmful`` (full fine-tune) and ``ft_harmful_lora``, fed
as the demo feeds ``recover`` (safealign/lab/compare.py): the first 128 ``harmful_train`` prompts
for the direction (and recover's own harmful rate, adaptive's stop rule), ``task_train``
examples for the rollback gradient (the first 64) and the utility check (the next 64, so the
check never scores what steers it), and, with the benign guard, the lab's 64 guard prompts
(:func:`safealign.lab.guard.guard_prompts`: the first 32 steer the rollback, the other 32 are
checked). Every output is then scored by
the demo's evaluator on the lab's held-out sets (``harmful_eval``, ``task_eval``,
``benign_eval``), which no run sees. ``paper`` runs as the authors' code (no over-refusal
guard); every schedule also runs with the guard, as the demo runs them.

Cost: each run's wall time is also given as a multiple of one evaluation of B on the run's own
sets (``eval_harmful``, the checked ``task`` half, and the guard's checked half when guarded),
scored with recover's own scoring settings and timed in the same script (``x_eval``).

    OMP_NUM_THREADS=1 python benchmarks/bench_recover_quality.py --size test
    python benchmarks/bench_recover_quality.py --size default --device cuda
    python benchmarks/bench_recover_quality.py --size test-prior
    python benchmarks/bench_recover_quality.py --size smollm2 --runs adaptive+guard \
        --models ft_harmful_lora --max-minutes 12

Prints a table and writes benchmarks/results/recover_quality_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from safealign.data import load_prompts, load_task
from safealign.eval import Evaluator
from safealign.lab import build
from safealign.lab.compare import CHECK_EXAMPLES, DIRECTION_PROMPTS, lab_evaluator
from safealign.lab.guard import GUARD_PROMPTS, guard_prompts
from safealign.recover import RecoverInputs, RecoverSettings, recover

HERE = Path(__file__).resolve().parent
#: recover's rollback steers on the first half of the lab's check examples, checks the second.
ROLLBACK_EXAMPLES = CHECK_EXAMPLES // 2
MODELS = ("ft_harmful", "ft_harmful_lora")
#: (schedule, benign guard): the default as the demo runs it, the authors' loop as they ran
#: it, then the fixed schedules with the guard and guarded without.
RUNS = (
    ("adaptive", True),
    ("paper", False),
    ("paper", True),
    ("guarded", False),
    ("guarded", True),
)
RUN_NAMES = {
    f"{schedule}{'+guard' if guard else ''}": (schedule, guard) for schedule, guard in RUNS
}
COLUMNS = (
    "model",
    "schedule",
    "guard",
    "harmful_rate",
    "utility",
    "over_refusal",
    "kept_step",
    "attempt",
    "restarted",
    "seconds",
    "x_eval",
    "x_own",
)


def inputs(lab) -> dict:
    """The sets every run is fed (as the demo feeds them)."""
    examples = load_task(lab.data("task_train")).examples
    return {
        "harmful": load_prompts(lab.data("harmful_train")).prompts[:DIRECTION_PROMPTS],
        "task_train": examples[:ROLLBACK_EXAMPLES],
        "task": examples[ROLLBACK_EXAMPLES : 2 * ROLLBACK_EXAMPLES],
        "guard": guard_prompts(lab),
    }


def recover_inputs(lab, model: str, sets: dict, benign) -> RecoverInputs:
    """recover's inputs on ``model`` as the demo feeds them, with ``benign`` as the guard."""
    return RecoverInputs(
        lab.aligned,
        lab.model(model),
        harmful=sets["harmful"],
        task=sets["task"],
        task_train=sets["task_train"],
        benign=benign,
    )


def eval_seconds(lab, model: str, sets: dict, guard: bool, device: str | None) -> float:
    """One evaluation of ``model`` (B) on a run's own sets with recover's scoring settings
    (its harmful prompts, the checked task half, the checked half of the guard's prompts):
    the unit of recover's cost."""
    settings = RecoverSettings()
    guarded = sets["guard"][len(sets["guard"]) // 2 :]
    evaluator = Evaluator(
        harmful=sets["harmful"],
        task=sets["task"],
        benign=guarded if guard else None,
        judge=settings.judge,
        metric=settings.metric,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        cache=False,
    )
    adapter = lab.model(model) if model.endswith("_lora") else None
    folder = lab.aligned if adapter else lab.model(model)
    start = time.perf_counter()
    evaluator.score_folder(folder, adapter=adapter, device=device)
    return time.perf_counter() - start


def measure(
    lab,
    root: Path,
    device: str | None,
    runs=RUNS,
    models=MODELS,
    max_minutes: float | None = None,
    step_prompts: int | None = None,
) -> list[dict]:
    """Score A and each fine-tune, then every (model, schedule, guard) run; one row each."""
    evaluator, sets, rows = lab_evaluator(lab), inputs(lab), []
    for name in ("aligned", *models):
        lora = name.endswith("_lora")
        folder, adapter = (lab.aligned, lab.model(name)) if lora else (lab.model(name), None)
        scores = evaluator.score_folder(folder, adapter=adapter)
        rows.append(row(name, "input", None, scores, None, seconds=None))
    for model in models:
        units = {g: eval_seconds(lab, model, sets, g, device) for g in {g for _, g in runs}}
        for schedule, guard in runs:
            start = time.perf_counter()
            given = recover_inputs(lab, model, sets, sets["guard"] if guard else None)
            # write_unchanged: kept step 0 in the table (no repair held, B scored)
            settings = RecoverSettings(
                schedule=schedule,
                device=device,
                write_unchanged=True,
                max_minutes=max_minutes,
                step_prompts=step_prompts,
            )
            result = recover(given, settings, root / f"{model}_{schedule}_{int(guard)}")
            seconds = time.perf_counter() - start
            scores = evaluator.score_folder(result.out)
            rows.append(row(model, schedule, guard, scores, result, seconds, units[guard]))
            print(format_row(rows[-1]), flush=True)
    return rows


def row(
    model: str, schedule: str, guard, scores, result, seconds: float | None, unit: float = 0.0
) -> dict:
    """One line of the table: held-out scores, kept step, the adaptive attempt kept, whether a
    paper run restarted, wall time, and wall time over one evaluation of B on the run's sets
    (``unit``)."""
    run = None if result is None else result.run
    restarted = None if run is None else any(s.phase == "restart" for s in run.steps)
    attempt = next((a["attempt"] for a in (result.attempts if result else []) if a["kept"]), None)
    return {
        "model": model,
        "schedule": schedule,
        "guard": guard,
        "harmful_rate": scores.harmful_rate,
        "utility": scores.utility,
        "over_refusal": scores.over_refusal,
        "kept_step": None if run is None else run.kept_step,
        "attempt": attempt,
        "restarted": restarted,
        "seconds": None if seconds is None else round(seconds, 1),
        "x_eval": round(seconds / unit, 1) if seconds is not None and unit else None,
        # recover's own ratio: its run over its own timing of B's scoring (--max-cost's unit)
        "x_own": None if result is None else result.x_eval,
        "attempts": result.attempts if result else [],
    }


def format_row(item: dict) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float) and not isinstance(value, bool):
            return f"{value:.3f}"
        return str(value)

    return "| " + " | ".join(cell(item[c]) for c in COLUMNS) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size",
        choices=("test", "default", "test-prior", "default-prior", "smollm2"),
        default="test",
    )
    parser.add_argument("--runs", nargs="+", choices=tuple(RUN_NAMES), default=tuple(RUN_NAMES))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--max-minutes", type=float, help="recover's --max-minutes (adaptive)")
    parser.add_argument(
        "--step-prompts", type=int, help="recover's --step-prompts [each schedule's own]"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, help="JSON [results/recover_quality_<size>.json]")
    args = parser.parse_args()
    lab = build(size=args.size, seed=args.seed, log=print)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [RUN_NAMES[name] for name in args.runs]
        rows = measure(
            lab, Path(tmp), args.device, runs, args.models, args.max_minutes, args.step_prompts
        )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for item in rows:
        print(format_row(item))
    out = args.out or HERE / "results" / f"recover_quality_{args.size}.json"
    record = {
        "lab": {"size": args.size, "seed": args.seed, "key": lab.info.get("key")},
        "feed": {
            "direction_prompts": DIRECTION_PROMPTS,
            "task_train": f"task_train[:{ROLLBACK_EXAMPLES}]",
            "task_check": f"task_train[{ROLLBACK_EXAMPLES}:{2 * ROLLBACK_EXAMPLES}]",
            "guard": f"{GUARD_PROMPTS} guard_prompts (safealign.lab.guard; first half steers)",
            "scored_on": ["harmful_eval", "task_eval", "benign_eval"],
        },
        "max_minutes": args.max_minutes,
        "step_prompts": args.step_prompts,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
