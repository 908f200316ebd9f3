"""recover's gradient pass with a batch's shared chat prefix run once, against one pass over the
whole prompts, on the real-model lab (SmolLM2's template opens every prompt with a system
prompt).

One recover step's harmful-direction gradient (``cosine_backward``: the lab's 128 direction
prompts in recover's batches of 8, layer 20 of 30) on ``ft_harmful``, timed round-robin, each form
``--repeats`` times, in one process; the table gives the median seconds, their ratio, the
tokens each form runs, and how far the gradients are apart (relative L2, and the share of the
top 0.2% elements by |gradient|, one step's picks, that both forms pick).

    python benchmarks/bench_direction.py [--repeats 3]

Writes benchmarks/results/direction.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safealign.data import load_prompts
from safealign.lab import build
from safealign.lab.compare import DIRECTION_PROMPTS
from safealign.layers import decoder_layers
from safealign.recover import RecoverSettings, direction
from safealign.report import markdown_table, write_json

RESULTS = Path(__file__).parent / "results"
LAYER = 20
#: recover's defaults: prompts per gradient batch, and one step's share of elements restored.
BATCH = RecoverSettings().grad_batch_size
RATE = RecoverSettings().rate


def gradient(model, tokenizer, prompts, target, shared: bool) -> tuple[torch.Tensor, float, int]:
    """The summed gradient of one pass, its seconds, and the tokens it ran."""
    minimum = direction.MIN_SHARED_PREFIX
    direction.MIN_SHARED_PREFIX = minimum if shared else 10**9
    try:
        batches = list(direction.encoded_batches(tokenizer, prompts, BATCH, torch.device("cpu")))
        tokens = sum(
            b.input_ids.numel() + (0 if b.prefix is None else b.prefix.numel()) for b in batches
        )
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        direction.cosine_backward(model, tokenizer, prompts, LAYER, target, BATCH)
        seconds = time.perf_counter() - start
    finally:
        direction.MIN_SHARED_PREFIX = minimum
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lab = build(size="smollm2", log=print)
    prompts = load_prompts(lab.data("harmful_train")).prompts[:DIRECTION_PROMPTS]
    tokenizer = AutoTokenizer.from_pretrained(lab.aligned)
    model = AutoModelForCausalLM.from_pretrained(lab.model("ft_harmful"), dtype=torch.float32)
    model.requires_grad_(False)
    for block in decoder_layers(model)[:LAYER]:
        block.requires_grad_(True)
    with torch.no_grad():
        target = direction.mean_state(model, tokenizer, prompts, LAYER, BATCH)
    times: dict[bool, list[float]] = {False: [], True: []}
    grads, tokens = {}, {}
    for _ in range(args.repeats):
        for shared in (False, True):
            grads[shared], seconds, tokens[shared] = gradient(
                model, tokenizer, prompts, target, shared
            )
            times[shared].append(seconds)
    k = int(RATE * grads[False].numel())
    picks = [set(g.abs().topk(k).indices.tolist()) for g in (grads[False], grads[True])]
    one, split = statistics.median(times[False]), statistics.median(times[True])
    rows = [
        {"form": "one pass", "seconds": round(one, 2), "x one pass": 1.0, "tokens": tokens[False]},
        {
            "form": "shared prefix once",
            "seconds": round(split, 2),
            "x one pass": round(split / one, 3),
            "tokens": tokens[True],
        },
    ]
    relative = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    same_picks = len(picks[0] & picks[1]) / k
    print(markdown_table(rows))
    print(f"gradient relative L2 difference {relative:.2e}; picks shared {same_picks:.6f}")
    write_json(
        RESULTS / "direction.json",
        {
            "lab": {"size": "smollm2", "key": lab.info["key"]},
            "prompts": len(prompts),
            "layer": LAYER,
            "batch": BATCH,
            "repeats": args.repeats,
            "rows": rows,
            "times": {"one pass": times[False], "shared prefix once": times[True]},
            "gradient_relative_difference": relative,
            "same_picks": same_picks,
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
            "versions": {"torch": torch.__version__, "transformers": version("transformers")},
        },
    )


if __name__ == "__main__":
    main()
