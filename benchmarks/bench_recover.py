"""safealign recover: peak RSS and wall time on random Llama checkpoints of growing size.

For each size an aligned checkpoint A (random; fp32 unless --dtype) and a fine-tuned
B = A + noise are written tensor by tensor (no model is built to write them), with a
word-level tokenizer and a chat template. Each ``recover`` runs in its own process (few
steps, tiny prompt sets) and reports its peak RSS (``getrusage`` of itself at exit) and, on
a GPU, its peak CUDA memory. The goal: peak RSS <= 2.5x the bytes of the fine-tuned model
(no second full model in memory). A tiny run gives the fixed cost of Python, torch and
transformers, shown as "baseline" and subtracted in the last ratio column.

    OMP_NUM_THREADS=2 flock /tmp/safealign-cpu.lock python benchmarks/bench_recover.py
    python benchmarks/bench_recover.py --device cuda --dtype bfloat16 --sizes 800M,7B \\
        --out benchmarks/results/recover_cuda.json   # on a GPU machine

Gradients are summed in fp32 whatever the files' dtype. On bf16 files that costs 4 bytes per
restorable element instead of 2 (``--dtype bfloat16``, CPU, results/recover_bf16.json): peak
RSS at 800M 4.30 GiB against 3.45 GiB with bf16 sums (+0.86 GiB, 0.57x the model's bytes;
200M: +0.21 GiB), so (peak - baseline)/model rises from 2.05 to 2.62. On fp32 files the sums
are the ``.grad`` buffers themselves: no cost.

Prints a table and writes benchmarks/results/recover.json. Checkpoints go to a temporary
folder that is removed afterwards (``--keep DIR`` keeps them there instead).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
GIB = 2**30
SHARD_BYTES = 512 * 2**20
SIZES = {  # name: (layers, hidden, intermediate, vocab)
    "tiny": (2, 64, 128, 512),
    "50M": (12, 512, 1408, 8192),
    "200M": (14, 1024, 2816, 8192),
    "800M": (15, 2048, 5632, 8192),
    "7B": (32, 4096, 11008, 32000),  # Llama-2-7B shapes; use --dtype bfloat16 --device cuda
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HARMFUL = ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9 w10 w11 w12", "w13 w14"]
TASK = [{"prompt": "w20 w21 w22", "answer": "w30"}, {"prompt": "w23 w24", "answer": "w31"}]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
RUN = """
import json, resource, sys, time
from safealign.recover import RecoverInputs, RecoverSettings, recover
args = json.loads(sys.argv[1])
start = time.perf_counter()
result = recover(RecoverInputs(**args["inputs"]), RecoverSettings(**args["settings"]), args["out"])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cuda = None
if (args["settings"].get("device") or "cpu").startswith("cuda"):
    import torch
    cuda = torch.cuda.max_memory_allocated()
print(json.dumps({"peak_rss": peak, "peak_cuda": cuda, "seconds": seconds,
                  "estimate": result.plan.memory["total"], "restored": result.run.restored,
                  "steps": [s.seconds for s in result.run.steps]}))
"""


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def tensor_shapes(layers: int, hidden: int, intermediate: int, vocab: int):
    yield "model.embed_tokens.weight", (vocab, hidden)
    kv = max(1, hidden // 64) * 64
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (intermediate, hidden)
        yield p + "mlp.up_proj.weight", (intermediate, hidden)
        yield p + "mlp.down_proj.weight", (hidden, intermediate)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    words = special + [f"w{i}" for i in range(vocab - len(special))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def write_pair(
    root: Path, size: str, dtype: str = "float32", seed: int = 0
) -> tuple[Path, Path, int, int]:
    """Write A (random) and B (A + noise) as sharded safetensors; return paths, params and
    bytes of B."""
    torch_dtype, item = DTYPES[dtype], DTYPES[dtype].itemsize
    dims = SIZES[size]
    aligned, finetuned = root / size / "aligned", root / size / "finetuned"
    gen = torch.Generator().manual_seed(seed)
    for folder in (aligned, finetuned):
        folder.mkdir(parents=True, exist_ok=True)
    pending: dict[Path, dict] = {aligned: {}, finetuned: {}}
    weight_map: dict[Path, dict] = {aligned: {}, finetuned: {}}
    params = 0

    def flush(folder: Path) -> None:
        file = f"model-{len(set(weight_map[folder].values())) + 1:05d}.safetensors"
        save_file(pending[folder], str(folder / file), metadata={"format": "pt"})
        weight_map[folder].update(dict.fromkeys(pending[folder], file))
        pending[folder] = {}

    for name, shape in tensor_shapes(*dims):
        if len(shape) == 1:
            a = torch.ones(shape, dtype=torch_dtype)
            b = a.clone()
        else:
            a32 = 0.02 * torch.randn(shape, generator=gen)
            a = a32.to(torch_dtype)
            b = a32.add_(0.002 * torch.randn(shape, generator=gen)).to(torch_dtype)
            del a32
        params += a.numel()
        for folder, tensor in ((aligned, a), (finetuned, b)):
            pending[folder][name] = tensor
            if sum(t.numel() for t in pending[folder].values()) * item > SHARD_BYTES:
                flush(folder)
    for folder in (aligned, finetuned):
        if pending[folder]:
            flush(folder)
        index = {"metadata": {"total_size": params * item}, "weight_map": weight_map[folder]}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text(json.dumps(llama_config(*dims, dtype)))
        write_tokenizer(folder, dims[3])
    return aligned, finetuned, params, params * item


def run_recover(aligned: Path, finetuned: Path, out: Path, steps: int, device: str) -> dict:
    args = {
        "inputs": {
            "aligned": str(aligned),
            "finetuned": str(finetuned),
            "harmful": HARMFUL,
            "task": TASK,
        },
        "settings": {
            "device": device,
            "steps": steps,
            "warmup": 1,
            "max_new_tokens": 4,
            "grad_batch_size": 4,
        },
        "out": str(out),
    }
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", RUN, json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(root: Path, size: str, args: argparse.Namespace) -> dict:
    """Write one pair, recover it in a child process, remove it (unless ``--keep``)."""
    started = time.perf_counter()
    aligned, finetuned, params, nbytes = write_pair(root, size, args.dtype)
    written = time.perf_counter() - started
    measured = run_recover(aligned, finetuned, root / size / "out", args.steps, args.device)
    shutil.rmtree(root / size / "out", ignore_errors=True)
    if not args.keep:
        shutil.rmtree(root / size, ignore_errors=True)
    print(f"{size}: done in {measured['seconds']:.1f}s", file=sys.stderr, flush=True)
    return {
        "size": size,
        "params": params,
        "model_bytes": nbytes,
        "peak_rss_bytes": measured["peak_rss"],
        "peak_cuda_bytes": measured["peak_cuda"],
        "estimate_bytes": measured["estimate"],
        "seconds": round(measured["seconds"], 2),
        "seconds_per_step": round(sum(measured["steps"]) / len(measured["steps"]), 2),
        "restored": measured["restored"],
        "write_seconds": round(written, 2),
    }


def print_table(rows: list[dict], baseline: int) -> None:
    header = (
        f"{'size':>5} {'params':>12} {'model GiB':>9} {'peak GiB':>8} {'peak/model':>10} "
        f"{'(peak-base)/model':>17} {'est GiB':>7} {'total s':>8} {'s/step':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:>5} {r['params']:>12,} {r['model_bytes'] / GIB:>9.3f} "
            f"{r['peak_rss_bytes'] / GIB:>8.3f} {r['ratio']:>10.2f} "
            f"{r['ratio_above_baseline']:>17.2f} {r['estimate_bytes'] / GIB:>7.2f} "
            f"{r['seconds']:>8.1f} {r['seconds_per_step']:>7.2f}"
        )
    for r in rows:
        if r["peak_cuda_bytes"] is not None:
            cuda = r["peak_cuda_bytes"]
            ratio = cuda / r["model_bytes"]
            print(f"{r['size']}: peak GPU memory {cuda / GIB:.2f} GiB = {ratio:.2f}x the model")
    print(f"baseline (tiny run, fixed cost): {baseline / GIB:.3f} GiB; goal: peak/model <= 2.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50M,200M,800M")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="of the files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", type=Path, help="write checkpoints here and keep them")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "recover.json")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-recover-"))
    try:
        rows = [measure(root, size, args) for size in ["tiny", *args.sizes.split(",")]]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    baseline = rows[0]["peak_rss_bytes"]
    for row in rows:
        row["ratio"] = round(row["peak_rss_bytes"] / row["model_bytes"], 3)
        row["ratio_above_baseline"] = round(
            (row["peak_rss_bytes"] - baseline) / row["model_bytes"], 3
        )
    print_table(rows, baseline)
    result = {
        "benchmark": "recover",
        "dtype": args.dtype,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "steps": args.steps,
        "prompts": {"harmful": len(HARMFUL), "task": len(TASK)},
        "baseline_peak_rss_bytes": baseline,
        "goal_ratio": 2.5,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
