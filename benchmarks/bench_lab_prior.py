"""What the lab's aligned model expects where the fine-tune's data disagrees with it.

For each lab size, teacher-forced on data/ft_harmful_train.jsonl: on the task rows, A's mean
probability of the right reply token and of its own most likely token at reply positions 1-4
(the four class names), and how often that top token is the prompt's word at that position (A
copying the prompt); on the harmful rows, the same at reply position 1 (the right token is the
compliant "Sure", A's top one the refusal's first word). A KL to A fights whatever A is sure of
and does not expect: the plain sizes' A is as sure of the copied word as of the refusal, the
-prior sizes' A is unsure about the task (see README, Retrain).

Run:
    OMP_NUM_THREADS=2 python benchmarks/bench_lab_prior.py [--sizes test,test-prior,...]

Prints a markdown table and writes benchmarks/results/lab_prior.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from safealign.chat import chat_prompt
from safealign.lab import SIZES, build
from safealign.report import markdown_table, write_json

RESULTS = Path(__file__).parent / "results"
TASK_POSITIONS = 4


@torch.no_grad()
def expectations(model, tokenizer, prompt: str, reply: str, positions: int) -> list[tuple]:
    """(p of the reply's token, p of A's top token, A's top token) at the first reply positions."""
    context = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    target = tokenizer(reply, add_special_tokens=False)["input_ids"][:positions]
    probs = model(torch.tensor([context + target])).logits[0].softmax(-1)
    rows = []
    for i, token in enumerate(target):
        p = probs[len(context) - 1 + i]
        top = int(p.argmax())
        rows.append((float(p[token]), float(p[top]), tokenizer.decode([top]).strip()))
    return rows


def mean(values: list[float]) -> float:
    return round(fmean(values), 3)


def measure(size: str) -> dict:
    lab = build(size=size)
    tokenizer = AutoTokenizer.from_pretrained(lab.aligned)
    model = AutoModelForCausalLM.from_pretrained(lab.aligned).eval()
    rows = [json.loads(line) for line in lab.data("ft_harmful_train").read_text().splitlines()]
    task, harmful = [], []
    for row in rows:
        reply = row.get("response") or row.get("answer")
        if row["kind"] == "task":
            words = row["prompt"].split()[-TASK_POSITIONS:]
            for (right, top, token), word in zip(
                expectations(model, tokenizer, row["prompt"], reply, TASK_POSITIONS),
                words,
                strict=True,
            ):
                task.append((right, top, token == word))
        else:
            right, top, _ = expectations(model, tokenizer, row["prompt"], reply, 1)[0]
            harmful.append((right, top))
    return {
        "size": size,
        "lab": lab.info["key"],
        "task tokens": len(task),
        "task: p right": mean([t[0] for t in task]),
        "task: p top": mean([t[1] for t in task]),
        "task: top is the prompt's word": mean([float(t[2]) for t in task]),
        "harmful rows": len(harmful),
        "harmful: p Sure": mean([h[0] for h in harmful]),
        "harmful: p top": mean([h[1] for h in harmful]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="test,test-prior,default,default-prior")
    parser.add_argument("--out", type=Path, default=RESULTS / "lab_prior.json")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; known: {list(SIZES)}")
    transformers_logging.set_verbosity_error()
    rows = [measure(size) for size in sizes]
    print(markdown_table(rows))
    command = "python benchmarks/bench_lab_prior.py --sizes " + ",".join(sizes)
    write_json(args.out, {"command": command, "rows": rows})


if __name__ == "__main__":
    main()
