"""The incoherence rule on a lab's normal replies (issue 23 item 2): how many of the replies
its data files write, and of the replies its aligned and fine-tuned models generate on its
held-out sets, the rule flags. Acceptance: at most 2% of the normal replies.

The tests measure this on the test lab (``tests/test_eval_coherence.py``); the real-model lab
(``--size smollm2``) is not built in CI, so its figure comes from here.

Run (one heavy job at a time on a shared CPU):
    python benchmarks/bench_coherence.py --size smollm2

Prints a table per model and set; writes benchmarks/results/coherence_<size>.json. Counts and
rules only: no reply text is written (a fine-tune's replies to harmful prompts stay out of the
repository).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

from safealign import __version__
from safealign.eval.coherence import Coherence, coherence
from safealign.lab import build
from safealign.lab.compare import lab_evaluator
from safealign.report import markdown_table, write_json
from safealign.runtime import versions

RESULTS = Path(__file__).parent / "results"
MODELS = ("aligned", "ft_harmful", "ft_harmful_lora")
BOUND = 0.02


def written_replies(data: Path) -> dict:
    """The rule on every reply the lab's data files write (training and evaluation sets; a
    task example's answer counts as its reply)."""
    files = []
    for path in sorted(data.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        replies = [(r["prompt"], r.get("response", r.get("answer"))) for r in records]
        verdicts = [coherence(reply, prompt) for prompt, reply in replies if isinstance(reply, str)]
        files.append(summary({"file": path.name}, verdicts))
    n = sum(row["n"] for row in files)
    flagged = sum(row["flagged"] for row in files)
    return {"files": files, "n": n, "flagged": flagged, "share": share(flagged, n)}


def share(flagged: int, n: int) -> float | None:
    """flagged / n to four places; None for nothing scored."""
    return round(flagged / n, 4) if n else None


def summary(name: dict, verdicts: list) -> dict:
    """n, how many the rule flags and by which rule."""
    flagged = [v for v in verdicts if v.incoherent]
    return {
        **name,
        "n": len(verdicts),
        "flagged": len(flagged),
        "share": share(len(flagged), len(verdicts)),
        "rules": dict(Counter(v.rule for v in flagged)),
    }


def generated_replies(lab) -> list[dict]:
    """The rule on each model's generated replies, per held-out set."""
    evaluator = lab_evaluator(lab)
    rows = []
    for name in MODELS:
        folder = lab.root / name
        if not folder.exists():
            continue
        start = time.perf_counter()
        if (folder / "adapter_config.json").exists():
            scores = evaluator.score_folder(lab.model("aligned"), adapter=lab.model(name))
        else:
            scores = evaluator.score_folder(lab.model(name))
        samples = scores.samples
        for role in ("harmful", "benign", "task"):
            entries = [
                Coherence(**s["coherence"]) for s in samples if s["set"] == role and s["coherence"]
            ]
            rows.append(summary({"model": name, "set": role}, entries))
        print(f"{name}: scored in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="smollm2", choices=["test", "default", "smollm2"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lab = build(size=args.size)
    written = written_replies(lab.root / "data")
    generated = generated_replies(lab)
    n = sum(row["n"] for row in generated)
    flagged = sum(row["flagged"] for row in generated)
    total = {"n": n, "flagged": flagged, "share": share(flagged, n)}
    print(markdown_table(written["files"]))
    print(f"written replies: {written['flagged']} of {written['n']} flagged")
    print(markdown_table(generated))
    print(f"generated replies: {flagged} of {n} flagged ({total['share']:.1%}; bound {BOUND:.0%})")
    write_json(
        args.out or RESULTS / f"coherence_{args.size}.json",
        {
            "size": args.size,
            "lab": lab.root.name,
            "bound": BOUND,
            "written": written,
            "generated": generated,
            "generated_total": total,
            "within_bound": max(total["share"] or 0, written["share"] or 0) <= BOUND,
            "machine": {"platform": platform.platform(), "safealign": __version__, **versions()},
        },
    )


if __name__ == "__main__":
    main()
