"""Every method on the real-model lab: SmolLM2-135M-Instruct aligned, then fine-tuned (issue 20).

One ``compare`` run per fine-tune (``ft_harmful_lora``, the LoRA one, and ``ft_harmful``, the
full one), every output scored by one evaluator on the lab's evaluation sets: HarmBench
(harmful rate, keyword judge), held-out benign prompts (over-refusal) and held-out tickets
(task, exact match). Methods run at their defaults; the retrain methods train a LoRA on A with
the fine-tune's data and the lab's LoRA schedule. Each row has harmful rate, task accuracy,
over-refusal, share of weights changed, wall time and peak memory; compare writes the
trade-off plot beside its report.

Run (the lab builds first if it is not cached; hours on 2 cores, resumable):
    python benchmarks/bench_real.py [--finetuned ft_harmful_lora ft_harmful] [--methods ...]

Writes benchmarks/results/real_<finetuned>.json and runs/bench_real/<finetuned>/ (report.md,
report.json, tradeoff.png); ``--resume`` keeps the methods already finished there. The JSON
also holds every row whole (``records``: scores with their intervals, time, memory), so that
``--reuse-results``, on a machine where the run folder is gone (a fresh checkout), can put the
committed rows back as compare's resume records and run only the methods it lacks (delete a
method's record in runs/bench_real/<finetuned>/runs/ to run it again).
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch

from safealign import __version__
from safealign.compare import CompareInputs, CompareSettings, compare
from safealign.compare.fingerprint import row_fingerprint, run_fingerprint
from safealign.compare.methods import DEFAULT_METHODS
from safealign.compare.report import table_rows
from safealign.compare.run import method_specs
from safealign.lab import Lab, build
from safealign.lab.compare import lab_inputs
from safealign.lab.phenomenon import format_table
from safealign.report import markdown_table, write_json

RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/bench_real")
#: compare's default methods, and the two retrain regularizers it leaves out.
METHODS = (*DEFAULT_METHODS, "retrain:ldifs", "retrain:interleave")
#: About the lab's LoRA fine-tune schedule (safealign.lab.real.RealLabConfig.finetune_lora:
#: 100 steps of 8 on 533 examples, lr 5e-4), given to every retrain method.
RETRAIN_OPTIONS = "epochs=2,grad_batch_size=8,lr=0.0005"
#: The lab's evaluation batch and reply length.
BATCH_SIZE = 64
MAX_NEW_TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", nargs="+", default=["ft_harmful_lora", "ft_harmful"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--reuse-results",
        action="store_true",
        help="Put the committed rows (benchmarks/results/real_<finetuned>.json's records) of "
        "the methods asked for back as resume records, where none is stored; implies --resume",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lab",
        help="A lab folder built before (its lab.json names its key), instead of building or "
        "finding the current code's build in the cache",
    )
    args = parser.parse_args()

    lab = Lab.open(args.lab) if args.lab else build(size="smollm2", seed=args.seed, log=print)
    print(format_table(lab.info["table"], lab.info["checks"]))
    for finetuned in args.finetuned:
        settings = CompareSettings(
            methods=tuple(args.methods),
            batch_size=BATCH_SIZE,
            max_new_tokens=MAX_NEW_TOKENS,
            retrain_options=RETRAIN_OPTIONS,
            seed=args.seed,
            resume=args.resume or args.reuse_results,
            overwrite=not (args.resume or args.reuse_results),
        )
        inputs = lab_inputs(lab, finetuned)
        if args.reuse_results:
            reuse_results(finetuned, inputs, settings)
        result = compare(inputs, settings, RUNS / finetuned, print)
        rows = table_rows(result)
        print(f"\n{finetuned} on the real-model lab (lab {lab.info['key']})")
        print(markdown_table(rows))
        write_json(
            RESULTS / f"real_{finetuned}.json",
            {
                "lab": {"size": "smollm2", "key": lab.info["key"], "seed": args.seed},
                "finetuned": finetuned,
                "settings": result.settings,
                "evaluator": result.evaluator,
                "rows": rows,
                "records": [asdict(row) for row in result.rows if row.kind != "input"],
                "recommendation": result.recommendation,
                "report": str(result.out),
                "machine": {
                    "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(),
                    "versions": {
                        "safealign": __version__,
                        "torch": torch.__version__,
                        "transformers": version("transformers"),
                    },
                },
            },
        )


def reuse_results(finetuned: str, inputs: CompareInputs, settings: CompareSettings) -> None:
    """Write the committed records of ``settings.methods`` as compare's resume records, under
    this run's fingerprints, where the run folder has none (the settings that change a score
    are the script's own, so a committed row was measured as this run would measure it)."""
    path = RESULTS / f"real_{finetuned}.json"
    records = {r["name"]: r for r in json.loads(path.read_text()).get("records", [])}
    runs = RUNS / finetuned / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_print = run_fingerprint(inputs, settings)
    for spec in method_specs(settings):
        record = runs / f"{spec.slug}.json"
        if spec.spec in records and not record.exists():
            stored = {"fingerprint": row_fingerprint(spec, run_print), **records[spec.spec]}
            record.write_text(json.dumps(stored, indent=2) + "\n")
            print(f"{spec.spec}: the committed row is reused ({path.name})")


if __name__ == "__main__":
    main()
