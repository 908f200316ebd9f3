"""Batched vs one-at-a-time generation, and the response cache, on the lab's model.

Run (on a shared CPU, under the lock):
    OMP_NUM_THREADS=2 flock /tmp/safealign-cpu.lock python benchmarks/bench_generation.py

Prompts: the lab's harmful_eval + task_eval. Prints a table and writes
benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from safealign.data import load_prompts, load_task
from safealign.eval import Evaluator, generate
from safealign.lab import Lab, build
from safealign.model import load_model

OUT = Path(__file__).parent / "results" / "generation.json"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=["default", "test"])
    parser.add_argument("--lab", type=Path, help="an already built lab folder (else build --size)")
    parser.add_argument("--model", default="ft_harmful", help="lab model folder name")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args()


def time_generation(model, tokenizer, prompts: list[str], args) -> dict:
    """Batched vs one-at-a-time generation, interleaved, best of ``args.repeats``."""
    settings = {"max_new_tokens": args.max_new_tokens}
    generate(model, tokenizer, prompts[:4], batch_size=4, **settings)  # warm-up

    def run_batched():
        return generate(model, tokenizer, prompts, batch_size=args.batch_size, **settings)

    def run_single():
        return [generate(model, tokenizer, [p], batch_size=1, **settings)[0] for p in prompts]

    batched_runs, single_runs = [], []
    for _ in range(args.repeats):  # interleaved, best of N: the CPU is shared
        batched_runs.append(timed(run_batched))
        single_runs.append(timed(run_single))
    batched, batched_s = min(batched_runs, key=lambda run: run[1])
    single, single_s = min(single_runs, key=lambda run: run[1])
    mismatches = sum(a != b for a, b in zip(batched, single, strict=True))
    return {
        "one_at_a_time_s": round(single_s, 3),
        "batched_s": round(batched_s, 3),
        "batched_speedup": round(single_s / batched_s, 2),
        "repeats": args.repeats,
        "batched_runs_s": [round(t, 3) for _, t in batched_runs],
        "one_at_a_time_runs_s": [round(t, 3) for _, t in single_runs],
        "identical_outputs": mismatches == 0
        and all(out == batched for out, _ in batched_runs + single_runs),
        "mismatched_outputs": mismatches,
    }


def time_cache(folder: Path, harmful, task, benign, args) -> dict:
    """The Evaluator on a cold and then a warm response cache."""
    with tempfile.TemporaryDirectory() as cache:
        evaluator = Evaluator(
            harmful,
            task,
            benign,
            batch_size=args.batch_size,
            cache_dir=cache,
            max_new_tokens=args.max_new_tokens,
        )
        cold = evaluator.score_folder(folder, dtype="float32")
        warm = evaluator.score_folder(folder, dtype="float32")
    rates = ("harmful_rate", "utility", "over_refusal")
    return {
        "evaluator_cold_s": round(cold.seconds, 3),
        "evaluator_cached_s": round(warm.seconds, 3),
        "cache_speedup": round(cold.seconds / warm.seconds, 1),
        "cached_responses_generated": warm.config["responses_generated"],
        "cached_scores_equal": all(getattr(cold, r) == getattr(warm, r) for r in rates),
        "evaluator_n": {"harmful": cold.n_harmful, "task": cold.n_task, "benign": cold.n_benign},
    }


def print_table(result: dict) -> None:
    single_s, batched_s = result["one_at_a_time_s"], result["batched_s"]
    cold_s, warm_s = result["evaluator_cold_s"], result["evaluator_cached_s"]
    rows = [
        ("one prompt at a time", f"{single_s:.2f} s", "1.0x"),
        (
            f"batched (batch {result['batch_size']})",
            f"{batched_s:.2f} s",
            f"{single_s / batched_s:.1f}x",
        ),
        ("Evaluator, cold cache", f"{cold_s:.2f} s", ""),
        ("Evaluator, warm cache", f"{warm_s:.3f} s", f"{cold_s / warm_s:.0f}x"),
    ]
    print(f"{result['prompts']} prompts (harmful_eval + task_eval), lab {result['model']}")
    for name, seconds, speedup in rows:
        print(f"{name:<28}{seconds:>12}{speedup:>8}")
    mismatches = result["mismatched_outputs"]
    print(f"identical outputs: {mismatches == 0} ({mismatches} differ)")


def main() -> None:
    args = parse_args()
    lab = Lab.open(args.lab) if args.lab else build(size=args.size)
    folder = lab.root / args.model
    harmful = load_prompts(lab.data("harmful_eval"))
    task = load_task(lab.data("task_eval"))
    benign = load_prompts(lab.data("benign_eval"))
    prompts = harmful.prompts + [e.prompt for e in task.examples]
    model, tokenizer = load_model(folder, dtype="float32")
    result = {
        "model": f"lab:{lab.info['size']}/{args.model}",
        "lab_key": lab.info["key"],
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        **time_generation(model, tokenizer, prompts, args),
        **time_cache(folder, harmful, task, benign, args),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
