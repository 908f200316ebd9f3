"""Choose the real-model lab's alignment stage on its validation splits (issue 20).

Aligns SmolLM2-135M-Instruct (U) as ``safealign lab build --size smollm2`` does, with the given
steps and learning rate, and scores the result on the validation splits only: Do-Not-Answer's
``harmful_val`` prompts with their instruction forms (harmful rate) and ``benign_val``
(over-refusal). HarmBench is not read for the choice. U's replies to the benign alignment
prompts are cached beside the results.

Run (about 25 min per setting on 2 cores):
    python benchmarks/bench_real_alignment.py --steps 180 --lr 1e-4

Appends a row to benchmarks/results/real_alignment.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from safealign.eval.generation import generate
from safealign.lab import real_corpus
from safealign.lab.benchmark_prompts import donotanswer_prompts, harmbench_prompts
from safealign.lab.corpus import Example
from safealign.lab.gguf import load_gguf, smollm2_gguf
from safealign.lab.phenomenon import lab_evaluator, measure
from safealign.lab.real import RealLabConfig, data_sets
from safealign.lab.train import train
from safealign.paths import cache_dir
from safealign.report import markdown_table

RESULTS = Path(__file__).parent / "results" / "real_alignment.json"


def own_replies(model, tokenizer, prompts: list[str], tokens: int) -> list[str]:
    """U's greedy replies to ``prompts``, cached by prompt list and length."""
    cache = cache_dir() / "bench_real_alignment_replies.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["prompts"] == prompts and saved["tokens"] == tokens:
            return saved["replies"]
    replies = generate(model, tokenizer, prompts, batch_size=64, max_new_tokens=tokens)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"prompts": prompts, "tokens": tokens, "replies": replies}))
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=RealLabConfig.aligned.steps)
    parser.add_argument("--lr", type=float, default=RealLabConfig.aligned.lr)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = RealLabConfig(name="smollm2")
    stage = dataclasses.replace(config.aligned, steps=args.steps, lr=args.lr)

    torch.manual_seed(args.seed)
    model, tokenizer = load_gguf(smollm2_gguf())
    data = real_corpus.generate(
        harmbench_prompts(), donotanswer_prompts(), config.corpus, args.seed
    )
    data = real_corpus.with_forms(data, args.seed)
    benign = data.benign_alignment
    replies = own_replies(model, tokenizer, [e.prompt for e in benign], config.reply_tokens)
    own = [Example(e.prompt, r, e.kind) for e, r in zip(benign, replies, strict=True)]
    sets = data_sets(data, own, config.harmful_share, args.seed)

    started = time.perf_counter()
    loss = train(model, tokenizer, sets["alignment_train"], stage, seed=args.seed * 100 + 2)
    seconds = time.perf_counter() - started
    evaluator = lab_evaluator(
        sets["harmful_val"],
        sets["benign_val"],
        sets["task_val"],
        batch_size=config.eval_batch_size,
        max_new_tokens=config.max_new_tokens,
    )
    row = {
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        **measure(evaluator, model, tokenizer),
        "final_loss": round(sum(loss[-10:]) / len(loss[-10:]), 4),
        "train_seconds": round(seconds, 1),
    }
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
