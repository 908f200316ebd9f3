"""safealign merge vs mergekit: wall time, peak RSS and output agreement on ~1 GB checkpoints.

Random-initialised Llama checkpoints (fp32, about 1.06 GB each) are written to a temporary folder;
each merge runs as its own process under ``/usr/bin/time -v`` (peak RSS = maximum resident set
size). mergekit runs from its own virtual environment (``--mergekit``, default
/work/mergekit-venv). Both compute in fp32 (``dtype: float32``) and write bf16 (``out_dtype``).

    flock /tmp/safealign-cpu.lock python benchmarks/bench_merge.py

Prints a table and writes benchmarks/results/merge.json. Temporary checkpoints are removed.

With ``--device cuda`` (a GPU machine) the engine computes there instead, on Llama checkpoints of
the ``--sizes`` presets in ``--dtype`` (bf16 by default; drawn on the device), without mergekit.
Each merge runs in its own process that reports its wall time, peak RSS (``getrusage``) and peak
GPU memory (``torch.cuda.max_memory_allocated``); for the ``--cpu-reference`` sizes the same
merge also runs with ``device="cpu"`` and the two outputs are compared.

    OMP_NUM_THREADS=16 python benchmarks/bench_merge.py --device cuda --sizes 1B,7B \\
        --cpu-reference 1B   # writes benchmarks/results/merge_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SIZES = {  # --sizes presets: (layers, hidden, intermediate, vocab)
    "1B": (22, 2048, 5632, 32000),  # TinyLlama-1.1B shapes
    "7B": (32, 4096, 11008, 32000),  # Llama-2-7B shapes
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MEASURED_MERGE = """
import json, resource, sys, time
import torch
from safealign.merge import MergeSettings, return_freed_tensors_to_os, run_merge
config, out, device = sys.argv[1:4]
return_freed_tensors_to_os()
if device.startswith("cuda"):
    torch.zeros(1, device=device)  # CUDA context made before the clock starts
start = time.perf_counter()
if config != "-":
    run_merge(config, MergeSettings(device=device), out)
seconds = time.perf_counter() - start
cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak, "peak_cuda": cuda}))
"""
SAFEALIGN_MERGE = (
    "import sys; from safealign.merge.cli import merge_command; "
    "sys.argv[0] = 'safealign merge'; merge_command()"
)


def llama_config(
    layers: int, hidden: int, intermediate: int, vocab: int, dtype: str = "float32"
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (i, h)
        shapes[f"{p}mlp.up_proj.weight"] = (i, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_checkpoint(
    folder: Path, cfg: dict, seed: int, base_seed: int | None, device: str = "cpu"
) -> None:
    """Random weights (or base weights plus small noise), two shards with an index.

    Drawn in fp32 on ``device`` (a GPU, with --device), stored in the config's dtype.
    """
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = tensor_shapes(cfg)
    dtype = DTYPES[cfg["torch_dtype"]]
    names = list(shapes)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        tensors = {}
        for name in part:
            g = torch.Generator(device).manual_seed(
                zlib.crc32(f"{base_seed or seed}:{name}".encode())
            )
            tensor = 0.02 * torch.randn(shapes[name], generator=g, device=device)
            if base_seed is not None:
                g2 = torch.Generator(device).manual_seed(
                    zlib.crc32(f"{seed}:{name}".encode()) ^ 0x5A5A
                )
                tensor += 0.002 * torch.randn(shapes[name], generator=g2, device=device)
            tensors[name] = tensor.to(dtype).cpu()
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def merge_config(method: str, base: Path, models: list[Path], dtype: str = "float32") -> dict:
    params = {"weight": 1.0 / len(models)}
    if method == "ties":
        params["density"] = 0.5
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(params)} for m in models],
        "dtype": dtype,
        "out_dtype": "bfloat16",
    }


def timed(cmd: list[str], env: dict) -> dict:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    return {"seconds": round(wall, 2), "peak_rss_mib": round(rss_kb / 1024, 1)}


def run_safealign(config: Path, out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-c", SAFEALIGN_MERGE, str(config), "--out", str(out), "--quiet"]
    return timed(cmd, env)


def run_mergekit(venv: Path, config: Path, out: Path, env: dict) -> dict:
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--quiet"]
    return timed(cmd, env)


def run_measured(config: Path | None, out: Path | None, device: str, env: dict) -> dict:
    """One merge in its own process (``config`` None: none, the fixed cost of the process)."""
    cmd = [sys.executable, "-W", "ignore", "-c", MEASURED_MERGE, str(config or "-"), str(out)]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, device], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"merge on {device} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {
        "seconds": round(measured["seconds"], 2),
        "process_seconds": round(wall, 2),
        "peak_rss_mib": round(measured["peak_rss"] / 2**20, 1),
    }
    if measured["peak_cuda"] is not None:
        row["peak_cuda_mib"] = round(measured["peak_cuda"] / 2**20, 1)
    return row


def compare(a: Path, b: Path) -> dict:
    """Largest difference between two outputs, and the share of elements beyond bf16 rounding."""
    index, other = _weight_map(a), _weight_map(b)
    if set(index) != set(other):
        raise RuntimeError(f"outputs hold different tensors: {sorted(set(index) ^ set(other))[:5]}")
    worst, beyond, total = 0.0, 0, 0
    for name, file in index.items():
        with safe_open(str(a / file), "pt") as fa, safe_open(str(b / other[name]), "pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        diff = (x - y).abs()
        worst = max(worst, diff.max().item())
        beyond += int((diff > 2**-7 * x.abs().clamp_min(1e-6) + 1e-6).sum())
        total += x.numel()
    return {"max_abs_diff": worst, "share_beyond_bf16_ulp": beyond / total}


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    files = list(folder.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            out.update(dict.fromkeys(f.keys(), file.name))
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit", type=Path, default=Path("/work/mergekit-venv"))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--max-models", type=int, default=4)
    parser.add_argument(
        "--device", default="cpu", help="not cpu: the engine computes there, no mergekit"
    )
    parser.add_argument("--sizes", default="1B,7B", help=f"with --device: of {', '.join(SIZES)}")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="with --device")
    parser.add_argument(
        "--cpu-reference", default="1B", help="with --device: sizes also merged on the CPU"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: results/merge.json (--device: merge_DEVICE.json)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["PYTHONHASHSEED"] = "0"
    if args.device != "cpu":
        out = args.out or HERE / "results" / f"merge_{args.device.split(':')[0]}.json"
        bench_device(args, env, out)
        return
    args.out = args.out or HERE / "results" / "merge.json"
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.workdir))
    try:
        results = bench_cpu(args, env, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")


def bench_cpu(args: argparse.Namespace, env: dict, work: Path) -> dict:
    """safealign vs mergekit on checkpoints written to ``work``: two methods on two models, then
    task arithmetic on up to ``--max-models``."""
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
    base = work / "base"
    write_checkpoint(base, cfg, seed=0, base_seed=None)
    models = []
    for k in range(1, args.max_models + 1):
        models.append(work / f"model{k}")
        write_checkpoint(models[-1], cfg, seed=k, base_seed=0)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    setup = {
        "checkpoint_bytes": size,
        "params": size // 4,
        "dtype_in": "float32",
        "dtype_compute": "float32",
        "dtype_out": "bfloat16",
        "torch_threads": env["OMP_NUM_THREADS"],
        "mergekit": _mergekit_version(args.mergekit),
    }
    results: dict = {"setup": setup, "merges": [], "scaling": []}

    def one(method: str, n: int) -> dict:
        config = work / f"{method}-{n}.yaml"
        config.write_text(yaml.safe_dump(merge_config(method, base, models[:n])))
        return both_tools(args.mergekit, config, work, env, {"method": method, "models": n})

    for method in ("task_arithmetic", "ties"):
        results["merges"].append(one(method, 2))
    results["scaling"].append(
        {"models": 2, **{t: results["merges"][0][t] for t in ("safealign", "mergekit")}}
    )
    for n in range(3, args.max_models + 1):
        row = one("task_arithmetic", n)
        results["scaling"].append(
            {"models": n, "safealign": row["safealign"], "mergekit": row["mergekit"]}
        )
    return results


def both_tools(mergekit: Path, config: Path, work: Path, env: dict, row: dict) -> dict:
    """Run one config with safealign and mergekit; measurements and agreement added to ``row``."""
    outs = {}
    for tool in ("safealign", "mergekit"):
        out = work / f"out-{tool}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "safealign":
            row[tool] = run_safealign(config, out, env)
        else:
            row[tool] = run_mergekit(mergekit, config, out, env)
        outs[tool] = out
        print(f"  {row['method']} x{row['models']} {tool}: {row[tool]}", flush=True)
    row["agreement"] = compare(outs["safealign"], outs["mergekit"])
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return row


def bench_device(args: argparse.Namespace, env: dict, out: Path) -> None:
    """task_arithmetic and TIES of two models on ``args.device`` for each size preset; the
    ``--cpu-reference`` sizes also on the CPU, outputs compared."""
    sizes = args.sizes.split(",")
    references = set(filter(None, args.cpu_reference.split(",")))
    unknown = sorted((set(sizes) | references) - set(SIZES))
    if unknown:
        raise SystemExit(f"--sizes/--cpu-reference: unknown {unknown}; known: {list(SIZES)}")
    results: dict = {
        "setup": {
            "device": args.device,
            "gpu": torch.cuda.get_device_name(args.device) if "cuda" in args.device else None,
            "torch": torch.__version__,
            "dtype_in": args.dtype,
            "dtype_compute": "float32",
            "dtype_out": "bfloat16",
            "torch_threads": env["OMP_NUM_THREADS"],
            "baseline": run_measured(None, None, args.device, env),
        },
        "rows": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"baseline (imports, CUDA context): {results['setup']['baseline']}", flush=True)
    for size in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-merge-{size}-", dir=args.workdir))
        try:
            cfg = llama_config(*SIZES[size], dtype=args.dtype)
            base = work / "base"
            start = time.perf_counter()
            write_checkpoint(base, cfg, seed=0, base_seed=None, device=args.device)
            models = [work / "model1", work / "model2"]
            for k, model in enumerate(models, start=1):
                write_checkpoint(model, cfg, seed=k, base_seed=0, device=args.device)
            nbytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
            print(f"{size}: wrote 3 checkpoints in {time.perf_counter() - start:.0f} s", flush=True)
            for method in ("task_arithmetic", "ties"):
                config = work / f"{method}.yaml"
                config.write_text(yaml.safe_dump(merge_config(method, base, models, args.dtype)))
                row = {"size": size, "params": nbytes // DTYPES[args.dtype].itemsize}
                row.update(checkpoint_bytes=nbytes, method=method, models=2)
                devices = [args.device] + (["cpu"] if size in references else [])
                outs = {d: work / f"out-{d.replace(':', '')}" for d in devices}
                for device in devices:
                    row[device] = run_measured(config, outs[device], device, env)
                    print(f"  {size} {method} {device}: {row[device]}", flush=True)
                if len(devices) == 2:
                    row["agreement"] = compare(*outs.values())
                    print(f"  {size} {method} agreement: {row['agreement']}", flush=True)
                for folder in outs.values():
                    shutil.rmtree(folder, ignore_errors=True)
                results["rows"].append(row)
                out.write_text(json.dumps(results, indent=2) + "\n")  # kept if a later one fails
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_device_table(results)
    print(f"wrote {out}")


def print_device_table(results: dict) -> None:
    setup = results["setup"]
    device = setup["device"]
    print(
        f"\n{setup['gpu'] or device}; inputs {setup['dtype_in']}, compute fp32, output bf16; "
        f"baseline RSS {setup['baseline']['peak_rss_mib']} MiB"
    )
    print(
        f"| size | merge | {device} s | {device} peak GPU MiB | {device} RSS MiB | cpu s "
        "| cpu RSS MiB | max abs diff | beyond bf16 ulp |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        d, cpu, agree = row[device], row.get("cpu", {}), row.get("agreement", {})
        diff = agree.get("max_abs_diff")
        share = agree.get("share_beyond_bf16_ulp")
        print(
            f"| {row['size']} | {row['method']} | {d['seconds']} | {d.get('peak_cuda_mib', '-')} | "
            f"{d['peak_rss_mib']} | {cpu.get('seconds', '-')} | {cpu.get('peak_rss_mib', '-')} | "
            f"{'-' if diff is None else f'{diff:.2e}'} | "
            f"{'-' if share is None else f'{share:.2e}'} |"
        )


def _mergekit_version(venv: Path) -> str:
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or "unavailable"


def print_table(results: dict) -> None:
    gb = results["setup"]["checkpoint_bytes"] / 1e9
    print(
        f"\ninputs: {gb:.2f} GB fp32 each; compute fp32, output bf16; mergekit "
        f"{results['setup']['mergekit']}"
    )
    print(
        "| merge | models | safealign s | mergekit s | safealign RSS MiB | mergekit RSS MiB "
        "| max abs diff | beyond bf16 ulp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in results["merges"]:
        s, m, agree = row["safealign"], row["mergekit"], row["agreement"]
        print(
            f"| {row['method']} | {row['models']} | {s['seconds']} | {m['seconds']} | "
            f"{s['peak_rss_mib']} | {m['peak_rss_mib']} | {agree['max_abs_diff']:.2e} | "
            f"{agree['share_beyond_bf16_ulp']:.2e} |"
        )
    print("\npeak RSS (MiB) of task_arithmetic as input models grow")
    print("| models | safealign | mergekit |")
    print("|---|---|---|")
    for row in results["scaling"]:
        print(
            f"| {row['models']} | {row['safealign']['peak_rss_mib']} | "
            f"{row['mergekit']['peak_rss_mib']} |"
        )


if __name__ == "__main__":
    main()
