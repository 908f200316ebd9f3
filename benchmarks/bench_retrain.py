"""Regularized retraining on the lab: each regularizer trains ``aligned`` on ``ft_harmful``'s data.

Every run fine-tunes the lab's aligned model (LoRA, the default) on data/ft_harmful_train.jsonl
(task examples plus compliant answers to harmful requests), with each regularizer at its
default settings, and scores the adapter with the demo's evaluator (held-out harmful, task and
benign sets). Step time and peak training memory are also given relative to ``sft`` in the
same run. The probe critic of adaptive-kl and the harmful prompts der answers for its anchors
use the lab's harmful_train prompts; the probe's benign side is the lab's benign look-alikes
from its safety data. Neither holds a prompt of an evaluation set (dropped here) or of the
fine-tune's data (retrain drops those: on the tiny labs harmful_train holds the fine-tune's
harmful prompts). "probe AUROC" is the probe's on its own held-out split, "fine-tune AUROC"
on the fine-tune's examples, harmful vs task (the data's ``kind``).
interleave chooses its anchors from the lab's safety data, scored with the LoRA fine-tune
ft_harmful_lora as the misaligned model (``lab_spec``).

Columns: harmful / task / over-refusal rates; points against sft; training seconds; the run's
median step seconds; "micro-batch s": one micro-batch (forward, regularizer, backward) timed
round-robin with every other regularizer on one model and batch, and "step x sft" its ratio
to sft's (a shared CPU's load falls on all alike; the runs' own step times vary with it);
peak training memory: CUDA allocator peak on a GPU, on a CPU the process's RSS high-water mark
above the RSS at the loop's start (each regularizer in a fresh process; allocator-dependent,
coarse for a model this small).

Run (on a shared CPU, under the lock):
    OMP_NUM_THREADS=2 flock /tmp/safealign-cpu.lock python benchmarks/bench_retrain.py --size test

Prints a markdown table and writes benchmarks/results/retrain_<size>.json. ``--sweep
'kl:weight=0.5;kl:form=token-wise'`` instead trains each spec alone (the runs behind a
default) and writes benchmarks/results/retrain_sweep_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.utils import logging as transformers_logging

from safealign import __version__
from safealign.lab import SIZES, Lab, build
from safealign.lab.compare import RETRAIN_OPTIONS, lab_evaluator
from safealign.registry import parse_options, split_spec
from safealign.report import markdown_table, write_json
from safealign.retrain import RetrainInputs, RetrainSettings, retrain

RESULTS = Path(__file__).parent / "results"
REGULARIZERS = (
    "sft",
    "kl",
    "kl:form=token-wise",
    "adaptive-kl",
    "der",
    "epoch-kl",
    "l2",
    "ema",
    "ldifs",
    "interleave",
)
#: The lab's LoRA fine-tune schedule (how ft_harmful_lora was trained).
TRAINING = parse_options(RETRAIN_OPTIONS)
COLUMNS = (
    "regularizer",
    "harmful",
    "task",
    "over-refusal",
    "harmful pts below sft",
    "task pts vs sft",
    "train s",
    "step s",
    "micro-batch s",
    "step x sft",
    "memory MB",
    "memory x sft",
    "probe AUROC",
    "fine-tune AUROC",
    "task s",
)
#: The lab's evaluation sets: the probe's and the anchors' prompts hold none of theirs.
EVAL_SETS = ("harmful_eval", "benign_eval", "task_eval")


def stem(name: str) -> str:
    """A file name for a regularizer spec (``kl:form=token-wise`` -> ``kl_form-token-wise``)."""
    return name.replace(":", "_").replace("=", "-").replace(",", "_")


def probe_prompts(lab: Lab, folder: Path) -> tuple[Path, Path]:
    """The probe's and anchors' prompt files, harmful and benign, from the lab's training data
    (harmful_train; the safety data's look-alikes), without any evaluation prompt."""
    held = {p for name in EVAL_SETS for p in lab.prompts(name)}
    sets = {
        "harmful": lab.prompts("harmful_train"),
        "benign": lab.prompts("safety_train", kind="lookalike"),
    }
    paths = []
    for role, prompts in sets.items():
        path = folder / f"probe_{role}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts if p not in held))
        paths.append(path)
    return paths[0], paths[1]


def lab_spec(lab: Lab, name: str) -> str:
    """``name`` with the lab's inputs of interleave where it names none: the anchor pool is the
    lab's safety data (benign prompts with the replies A was aligned on; its refusals fall to
    the refusal filter), the misaligned model the lab's LoRA fine-tune B (ft_harmful_lora,
    trained on the same data with the same schedule, as compare's B)."""
    regularizer, rest = split_spec(name)
    if regularizer != "interleave":
        return name
    given = parse_options(rest) if rest else {}
    lab_inputs = {"anchors": lab.data("safety_train"), "misaligned": lab.ft_harmful_lora}
    added = [f"{key}={value}" for key, value in lab_inputs.items() if key not in given]
    return f"{regularizer}:{','.join(filter(None, [rest, *added]))}"


def lab_inputs(lab: Lab, folder: Path) -> RetrainInputs:
    """The aligned model, the fine-tune's data and the probe's prompts (:func:`probe_prompts`)."""
    harmful, benign = probe_prompts(lab, folder)
    return RetrainInputs(
        str(lab.aligned),
        str(lab.data("ft_harmful_train")),
        harmful=str(harmful),
        benign=str(benign),
    )


def run_one(lab: Lab, name: str, folder: Path, extra: dict) -> dict:
    """Train with regularizer ``name`` and score the output."""
    inputs = lab_inputs(lab, folder)
    settings = RetrainSettings.from_dict(TRAINING | extra | {"regularizer": lab_spec(lab, name)})
    result = retrain(inputs, settings, folder / stem(name))
    scores = lab_evaluator(lab).score_folder(lab.aligned, adapter=result.out)
    metrics = result.metrics
    return {
        "regularizer": name,
        "harmful": scores.harmful_rate,
        "task": scores.utility,
        "over-refusal": scores.over_refusal,
        "train s": round(metrics["train_seconds"], 1),
        "step s": metrics["step_seconds"],
        "memory MB": metrics["peak_memory_bytes"] / 2**20,
        "probe AUROC": metrics.get("probe_auroc"),
        "fine-tune AUROC": metrics.get("probe_finetune_auroc"),
        "task s": metrics.get("probe_task_score"),
        "final loss": metrics["final_loss"],
        "step times": [row["seconds"] for row in result.steps],
    }


def in_subprocess(size: str, name: str, extra: str, folder: Path) -> dict:
    """``run_one`` in a fresh process, so that each peak-memory figure starts clean."""
    path = folder / f"{stem(name)}.json"
    command = [sys.executable, __file__, "--size", size, "--one", name, "--set", extra]
    subprocess.run([*command, "--out", str(path)], check=True)
    return json.loads(path.read_text())


def step_costs(lab: Lab, names: list[str], folder: Path, rounds: int = 30) -> dict[str, float]:
    """Seconds of one micro-batch (forward, regularizer, backward) per regularizer, timed
    round-robin on the same model and batch so a shared CPU's load falls on all alike;
    the median over ``rounds``."""
    from safealign.chat import collate
    from safealign.retrain.build import build_model, build_reference
    from safealign.retrain.data import load_examples
    from safealign.retrain.loop import micro_step
    from safealign.retrain.regularizers import Run, create

    inputs = lab_inputs(lab, folder)
    settings = RetrainSettings.from_dict(TRAINING)
    model, tokenizer = build_model(inputs, settings)
    data = load_examples(tokenizer, inputs.data, text=False, max_length=512)
    examples = data.examples
    index = list(range(settings.grad_batch_size))
    batch = collate([examples[i] for i in index], tokenizer.pad_token_id)
    batch["index"] = torch.tensor(index)
    accelerator = SimpleNamespace(backward=lambda loss: loss.backward())
    runs = {}
    for name in names:
        regularizer = create(lab_spec(lab, name))
        run = Run(model, model, tokenizer, inputs, settings, examples, torch.device("cpu"))
        run.prompts, run.kinds = data.prompts, data.kinds
        run.reference = build_reference(model, regularizer, inputs, settings)
        regularizer.setup(run)
        runs[name] = (run, regularizer)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, (run, regularizer) in runs.items():
            start = time.perf_counter()
            micro_step(run, regularizer, batch, 1.0, accelerator)
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over steps of time / sft's time on the same step (both runs take the same
    batches in the same order, so batch shapes cancel; a shared CPU's bursts mostly do)."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=True))
    return ratios[len(ratios) // 2]


def relative(rows: list[dict]) -> None:
    """Add the columns against sft (points and ratios), when sft is among the rows."""
    base = next((r for r in rows if r["regularizer"] == "sft"), None)
    if base is None:
        return
    for row in rows:
        row["harmful pts below sft"] = 100 * (base["harmful"] - row["harmful"])
        row["task pts vs sft"] = 100 * (row["task"] - base["task"])
        row["step x sft"] = row["micro-batch s"] / base["micro-batch s"]
        row["step x sft (runs)"] = paired_ratio(row["step times"], base["step times"])
        row["memory x sft"] = row["memory MB"] / base["memory MB"] if base["memory MB"] else None


def sweep(size: str, specs: list[str], extra: str, lab: Lab) -> dict:
    """Each regularizer spec trained and scored alone (no step timing): the runs behind a
    default. The command that reproduces a row is in it."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            row = in_subprocess(size, spec, extra, Path(tmp))
            keys = ("regularizer", "harmful", "task", "over-refusal", "train s")
            keys += ("probe AUROC", "fine-tune AUROC", "task s")
            rows.append({k: row[k] for k in keys} | {"set": extra or None})
            print(f"{spec}: harmful {row['harmful']:.3f} task {row['task']:.3f}", flush=True)
    command = f"python benchmarks/bench_retrain.py --size {size} --sweep '{';'.join(specs)}'"
    return {
        "size": size,
        "lab": str(lab.root),
        "training": TRAINING | parse_options(extra),
        "command": command + (f" --set {extra}" if extra else ""),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="test")
    parser.add_argument("--only", help="Comma-separated regularizers (default: all).")
    parser.add_argument("--set", default="", help="Setting overrides, key=value,...")
    parser.add_argument("--out", type=Path, help="JSON path [results/retrain_<size>.json].")
    parser.add_argument("--sweep", help="Regularizer specs separated by ';', each run alone.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one regularizer, row to --out
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    torch.manual_seed(0)
    lab = build(size=args.size)
    extra = parse_options(args.set)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            write_json(args.out, run_one(lab, args.one, Path(tmp), extra))
        return
    if args.sweep:
        info = sweep(args.size, args.sweep.split(";"), args.set, lab)
        write_json(args.out or RESULTS / f"retrain_sweep_{args.size}.json", info)
        return
    names = args.only.split(",") if args.only else REGULARIZERS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(in_subprocess(args.size, name, args.set, Path(tmp)))
            print(f"{name}: harmful {rows[-1]['harmful']:.3f} task {rows[-1]['task']:.3f}")
        costs = step_costs(lab, list(names), Path(tmp))
    for row in rows:
        row["micro-batch s"] = costs[row["regularizer"]]
    relative(rows)
    print(markdown_table(rows, COLUMNS))
    out = args.out or RESULTS / f"retrain_{args.size}.json"
    info = {
        "size": args.size,
        "lab": str(lab.root),
        "training": TRAINING | extra,
        "safealign": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }
    write_json(out, info)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
