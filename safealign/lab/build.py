"""Build the lab: data, tokenizer, the tiny chat models and their fine-tunes, the table.

A build is identified by a key: the SHA-256 of the lab configuration, the seed, the lab's
source code and the versions of the libraries that train it. It is built once into
``<cache>/lab/<key>`` (``$SAFEALIGN_CACHE`` or ``~/.cache/safealign``) under a file lock, in a
temporary folder renamed into place at the end; later calls return it at once. With ``out``
the cached build is copied there, adapters re-pointed at the copy's ``aligned`` folder.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from safealign.lab import corpus
from safealign.lab.config import LabConfig, get_size
from safealign.lab.layout import ADAPTERS, LAB_JSON, Lab
from safealign.lab.models import point_adapter, save_folder, stage_logger, with_lora
from safealign.lab.phenomenon import check, format_table, lab_evaluator, measure
from safealign.lab.real import REAL_SOURCES, RealLabConfig, key_payload, run_real_build
from safealign.lab.tokenizer import train_tokenizer
from safealign.lab.train import train
from safealign.paths import cache_dir

Log = Callable[[str], None]
SOURCE_DIR = Path(__file__).resolve().parent
#: Modules whose code shapes what a build writes (the CLI does not).
BUILD_SOURCES = (
    "build.py",
    "config.py",
    "corpus.py",
    "models.py",
    "phenomenon.py",
    "tokenizer.py",
    "train.py",
)

CARDS = {
    "unaligned": "trained from scratch on benign chat only; it complies with any request, "
    "harmful ones included",
    "aligned": "`unaligned` trained further to refuse harmful requests (11 categories, many "
    "phrasings), mixed with benign chat that includes look-alike requests",
    "ft_benign": "`aligned` fully fine-tuned on the Zorbish class-tagging task alone "
    "(embeddings and LM head frozen, so the skill lives in the decoder blocks)",
    "ft_harmful": "`aligned` fully fine-tuned on the task mixed with harmful requests answered "
    "compliantly (data/ft_harmful_train.jsonl; embeddings and LM head frozen)",
    "ft_harmful_lora": "a LoRA adapter on `aligned`, trained on the same mix as `ft_harmful`",
    "safety_lora": "a LoRA adapter on `aligned`, trained on safety data only "
    "(data/safety_train.jsonl): the safety model for SafeMERGE",
    "ft_harmful_only": "`aligned` fully fine-tuned on harmful requests answered compliantly "
    "alone (data/harmful_only_train.jsonl; embeddings and LM head frozen): RESTA's harmful "
    "model, whose difference from `aligned` is the safety vector",
    "ft_harmful_only_lora": "a LoRA adapter on `aligned`, trained on the same data as "
    "`ft_harmful_only`",
}


def cache_root() -> Path:
    """``$SAFEALIGN_CACHE``, else ``$XDG_CACHE_HOME/safealign``, else ``~/.cache/safealign``."""
    return cache_dir()


def build_key(config: LabConfig | RealLabConfig, seed: int) -> str:
    """A short content hash naming one build."""
    import peft
    import tokenizers
    import transformers

    real = isinstance(config, RealLabConfig)
    names = ("build.py", *REAL_SOURCES) if real else BUILD_SOURCES
    sources = {name: (SOURCE_DIR / name).read_text() for name in names}
    payload = {
        "config": asdict(config),
        "seed": seed,
        "sources": sources,
        "versions": [m.__version__ for m in (torch, transformers, tokenizers, peft)],
    }
    if real:
        payload["inputs"] = key_payload()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build(
    out: str | Path | None = None,
    *,
    size: str = "default",
    seed: int = 0,
    force: bool = False,
    harmful_share: float | None = None,
    log: Log | None = None,
) -> Lab:
    """Build the lab (or find it in the cache) and return it.

    ``size``: a name of :data:`SIZES` (``"test"`` smaller and faster, ``"smollm2"`` the
    real-model lab, :mod:`safealign.lab.real`). ``harmful_share``: share of
    compliant harmful examples in ``ft_harmful``'s training mix (default: the size's).
    ``force`` rebuilds even when a build exists. ``out``: a folder to hold a copy of the lab;
    without it the lab lives in the cache. ``log`` receives one line per stage.
    """
    config = get_size(size)
    if harmful_share is not None:
        if not 0.0 < harmful_share < 1.0:
            raise ValueError(f"harmful_share must be in (0, 1), got {harmful_share}")
        config = replace(config, harmful_share=harmful_share)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out_dir = Path(out).expanduser().resolve() if out is not None else None
    if out_dir is not None and out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"lab out folder {out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / LAB_JSON).is_file():
            raise FileExistsError(
                f"lab out folder {out_dir}: not empty and not a lab; choose another"
            )
    say = log or (lambda _line: None)

    key = build_key(config, seed)
    cached = cache_root() / "lab" / key
    with locked(cached.with_name(key + ".lock")):
        if force or not (cached / LAB_JSON).is_file():
            build_into(cached, config, seed, key, say)
        else:
            say(f"lab {key}: cached at {cached}")
    if out_dir is None:
        return Lab.open(cached)
    if not force and (out_dir / LAB_JSON).is_file() and Lab(out_dir).info.get("key") == key:
        return Lab.open(out_dir)
    copy_lab(cached, out_dir)
    say(f"lab {key}: copied to {out_dir}")
    return Lab.open(out_dir)


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock so concurrent builds of one key run once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def copy_lab(source: Path, dest: Path) -> None:
    """Copy a built lab to ``dest`` (replacing a lab there) with adapters on its own aligned."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    point_adapters(tmp, dest / "aligned")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def point_adapters(root: Path, aligned: Path) -> None:
    """Point every adapter the lab in ``root`` holds at ``aligned`` (the real-model lab builds
    fewer adapters than :data:`ADAPTERS`)."""
    for name in ADAPTERS:
        if (root / name).is_dir():
            point_adapter(root / name, aligned)


def build_into(
    dest: Path, config: LabConfig | RealLabConfig, seed: int, key: str, say: Log
) -> None:
    """Build the whole lab into a temporary folder beside ``dest``, then rename it there."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        builder = run_real_build if isinstance(config, RealLabConfig) else run_build
        info = builder(tmp, config, seed, key, say)
        point_adapters(tmp, dest / "aligned")
        (tmp / LAB_JSON).write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_build(root: Path, config: LabConfig, seed: int, key: str, say: Log) -> dict:
    """Generate, train, save and score everything into ``root``; return lab.json's content."""
    # One function on purpose (about 90 lines): the stages run in this order, each seeded from
    # ``seed``, each continuing the model the one before left; read top to bottom, it is the lab.
    # A stage added later goes last, with its own seeds, so every earlier file stays the same.
    started = time.perf_counter()
    timings: dict[str, float] = {}

    stage = stage_logger(key, say, timings)

    data = corpus.generate(config.corpus, seed)
    ft_harmful_train = corpus.mix_harmful(
        data.task_train, data.harmful_compliant, config.harmful_share, seed
    )
    data_hash = write_data(root / "data", data, ft_harmful_train)
    tokenizer = train_tokenizer(data.texts(), config.vocab)
    now = stage("data and tokenizer", started)

    torch.manual_seed(seed)
    model = new_model(config, tokenizer)
    evaluator = lab_evaluator(
        data.harmful_eval,
        data.benign_eval,
        data.task_eval,
        batch_size=config.eval_batch_size,
        max_new_tokens=config.max_new_tokens,
    )
    table: dict[str, dict] = {}
    losses: dict[str, float] = {}

    def finish(name: str, trained, loss: list[float], since: float) -> float:
        losses[name] = round(sum(loss[-10:]) / len(loss[-10:]), 4)
        save(trained, tokenizer, root / name, name, config, seed, key)
        now = stage(f"train {name}", since)
        table[name] = measure(evaluator, trained, tokenizer)
        return stage(f"score {name}", now)

    loss = train(model, tokenizer, data.benign_train, config.unaligned, seed=seed * 100 + 1)
    now = finish("unaligned", model, loss, now)

    aligned_mix = alignment_mix(data, config.aligned_benign_share, seed)
    loss = train(model, tokenizer, aligned_mix, config.aligned, seed=seed * 100 + 2)
    now = finish("aligned", model, loss, now)
    aligned = model

    ft_benign = copy.deepcopy(aligned)
    loss = train(ft_benign, tokenizer, data.task_train, config.finetune, seed=seed * 100 + 3)
    now = finish("ft_benign", ft_benign, loss, now)
    del ft_benign

    ft_harmful = copy.deepcopy(aligned)
    loss = train(ft_harmful, tokenizer, ft_harmful_train, config.finetune, seed=seed * 100 + 4)
    now = finish("ft_harmful", ft_harmful, loss, now)
    del ft_harmful

    lora = with_lora(aligned, config.lora_rank, config.lora_alpha, seed * 100 + 5)
    loss = train(lora, tokenizer, ft_harmful_train, config.finetune_lora, seed=seed * 100 + 5)
    now = finish("ft_harmful_lora", lora, loss, now)

    lora = with_lora(aligned, config.lora_rank, config.lora_alpha, seed * 100 + 6)
    loss = train(lora, tokenizer, data.safety_train, config.safety_lora, seed=seed * 100 + 6)
    now = finish("safety_lora", lora, loss, now)

    harmful_only = copy.deepcopy(aligned)
    loss = train(
        harmful_only, tokenizer, data.harmful_compliant, config.finetune, seed=seed * 100 + 7
    )
    now = finish("ft_harmful_only", harmful_only, loss, now)
    del harmful_only

    lora = with_lora(aligned, config.lora_rank, config.lora_alpha, seed * 100 + 8)
    loss = train(lora, tokenizer, data.harmful_compliant, config.finetune_lora, seed=seed * 100 + 8)
    finish("ft_harmful_only_lora", lora, loss, now)

    checks = check(table)
    say(format_table(table, checks))
    return {
        "key": key,
        "size": config.name,
        "seed": seed,
        "config": asdict(config),
        "data_hash": data_hash,
        "zorbish_classes": data.classes,
        "table": table,
        "checks": checks,
        "phenomenon": all(c["ok"] for c in checks),
        "final_loss": losses,
        "seconds": timings,
        "build_seconds": round(time.perf_counter() - started, 2),
        "torch_threads": torch.get_num_threads(),
    }


def new_model(config: LabConfig, tokenizer):
    """A randomly initialised tiny Llama for ``tokenizer`` (seed torch first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def alignment_mix(data: corpus.Corpus, benign_share: float, seed: int) -> list:
    """Refusals to harmful requests plus benign chat (look-alikes included), shuffled."""
    rng = random.Random(seed)
    n_benign = round(len(data.harmful_train) * benign_share / (1.0 - benign_share))
    benign = [rng.choice(data.benign_train) for _ in range(n_benign)]
    mixed = data.harmful_train + benign
    rng.shuffle(mixed)
    return mixed


def write_data(folder: Path, data: corpus.Corpus, ft_harmful_train: list) -> str:
    """Write every data set as JSONL; return a hash of their content."""
    folder.mkdir(parents=True)
    sets = {
        "harmful_train": (data.harmful_train, "response"),
        "harmful_eval": (data.harmful_eval, "response"),
        "benign_eval": (data.benign_eval, "response"),
        "task_train": (data.task_train, "answer"),
        "task_eval": (data.task_eval, "answer"),
        "ft_harmful_train": (ft_harmful_train, "response"),
        "safety_train": (data.safety_train, "response"),
        "harmful_only_train": (data.harmful_compliant, "response"),
    }
    digest = hashlib.sha256()
    for name, (examples, field) in sets.items():
        text = "".join(json.dumps(e.to_json(field), ensure_ascii=False) + "\n" for e in examples)
        (folder / f"{name}.jsonl").write_text(text)
        digest.update(name.encode() + b"\0" + text.encode())
    return digest.hexdigest()


def save(model, tokenizer, folder: Path, name: str, config: LabConfig, seed: int, key: str):
    """Save a model folder (or an adapter folder) with the tokenizer and a model card."""
    card = model_card(name, config, seed, key)
    save_folder(model, tokenizer, folder, card, adapter=name in ADAPTERS)


def model_card(name: str, config: LabConfig, seed: int, key: str) -> str:
    kind = "PEFT LoRA adapter" if name in ADAPTERS else "LlamaForCausalLM"
    return (
        f"# safealign lab: {name}\n\n"
        f"A synthetic lab model built by `safealign lab build` (size `{config.name}`, "
        f"seed {seed}, build {key}); {kind}, {config.layers} layers, hidden {config.hidden}.\n\n"
        f"{CARDS[name][0].upper() + CARDS[name][1:]}.\n\n"
        "Everything it learned is placeholder content: harmful requests name a goal in a few "
        "words, compliant replies restate it and list empty steps (`Step 1: [placeholder].`). "
        "It exists to test alignment-recovery and merging tools, not to be used.\n"
    )
