"""SafetyLock (Zhu et al., arXiv 2410.10343): shift the fine-tuned model's safety heads toward
the aligned model's safe side, baked into the checkpoint as an ``o_proj`` bias.

As the authors' code (zhu-minjun/SafetyLock) does it: the *aligned* model reads harmful
questions answered safely and unsafely (the first 100 pairs); the outputs of its attention
heads at the replies' last 5 tokens train one probe per head; the 24 heads whose probes
separate best get the mass-mean direction (safe minus unsafe), scaled by the spread of the
samples along it and by ``strength`` (α = 6); the fine-tuned model's ``o_proj`` then adds
``W_o · shift`` to every position. The authors set that bias on the loaded model at run time
and save it; we write it as tensors into a copy of the fine-tuned checkpoint whose config turns
``attention_bias`` on (q/k/v biases written as zeros), so any loader runs it.

Where we differ, by necessity: the pairs. The authors ship a file of questions with a safe and
an unsafe answer; ``pairs`` takes such a file (``question``/``prompt``,
``answer_matching_behavior``/``safe``, ``answer_not_matching_behavior``/``unsafe``). Without
one, each harmful prompt is answered by the aligned model (safe) and by the fine-tuned model
(unsafe), greedily. The authors' probe split is unseeded; ours is seeded.

Ours, as an option (``contrast="prompts"``): the heads contrast harmful with benign prompts at
the last tokens of the chat-formatted prompt (the assistant turn opened), where the model
decides whether to refuse; no reply is generated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import torch

from safealign.chat import encode_chat
from safealign.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    ModelCard,
    check_output,
    is_adapter,
    validate_checkpoints,
)
from safealign.data import prompt_set, read_rows
from safealign.eval.generation import generate
from safealign.layers import layer_index, num_decoder_layers
from safealign.model import ensure_pad_token, load_model
from safealign.progress import ProgressCallback
from safealign.progress import say as report_line
from safealign.recover.heads import build_lock, head_activations, o_proj_biases, reply_ids
from safealign.report import write_json
from safealign.runtime import peak_rss_bytes
from safealign.settings import Settings, SettingsError, setting

REPORT_NAME = "safetylock.json"
QUESTION_FIELDS = ("question", "prompt")
SAFE_FIELDS = ("answer_matching_behavior", "safe")
UNSAFE_FIELDS = ("answer_not_matching_behavior", "unsafe")


@dataclass
class SafetyLockSettings(Settings):
    """How SafetyLock builds and applies its lock (defaults: the authors' code)."""

    heads: int = setting(24, help="Attention heads shifted (the authors' 24).", min=1)
    strength: float = setting(
        6.0, help="Shift per head in spreads of its samples (the authors' α = 6).", min=0.0
    )
    positions: int = setting(
        5, help="Last reply tokens each pair contributes as samples (the authors' 5).", min=1
    )
    contrast: str = setting(
        "replies",
        choices=("replies", "prompts"),
        help="What the heads contrast: replies (the authors': a harmful question answered "
        "safely vs unsafely, at the reply's last tokens) or prompts (harmful vs benign prompts "
        "at the last tokens of the chat-formatted prompt, where the model decides).",
    )
    max_pairs: int = setting(
        100, help="Pairs read, or prompts of each kind (the authors use the first 100).", min=2
    )
    max_new_tokens: int = setting(
        48, help="Reply length when the pairs are generated from the prompts.", min=1
    )
    batch_size: int = setting(16, help="", min=1)
    seed: int = setting(0, help="It draws the probes' 60/40 split.")
    device: str | None = setting(None, help="", default_text="cpu")
    overwrite: bool = setting(False, help="Replace a non-empty --out folder.")
    dry_run: bool = setting(False, help="Build the lock and print its heads; write nothing.")


@dataclass(frozen=True)
class SafetyLockInputs:
    """What SafetyLock reads: A, B (a model folder or a LoRA adapter on A) and its contrast: for
    ``replies``, ``pairs`` (a file of question, safe and unsafe answer) or ``harmful`` prompts
    that A and B answer; for ``prompts``, ``harmful`` and ``benign`` prompts."""

    aligned: str | Path
    finetuned: str | Path
    harmful: object = None
    pairs: str | Path | None = None
    benign: object = None


@dataclass
class SafetyLockResult:
    """The written folder (None on a dry run) and the report written beside it."""

    out: Path | None
    report: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One contrast sequence: a prompt, the reply read after it (None: the prompt alone, the
    assistant turn opened) and its label (1: the side the lock shifts toward)."""

    prompt: str
    reply: str | None
    label: int


@dataclass(frozen=True)
class Pair:
    """A harmful question with a safe and an unsafe answer."""

    prompt: str
    safe: str
    unsafe: str


class AlignedModel:
    """A (fp32, with its tokenizer), loaded on first use and kept for the run: its replies and
    its head activations come from one load."""

    def __init__(self, checkpoint: Checkpoint, device: str | None):
        self.checkpoint = checkpoint
        self.device = device

    @cached_property
    def loaded(self) -> tuple:
        return _load(self.checkpoint, self.checkpoint, self.device)


def load_contrast_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a JSON/JSONL file in the authors' format (or prompt/safe/unsafe)."""
    pairs = []
    for row in read_rows(path):
        value = row.value if isinstance(row.value, dict) else {}
        texts = [next((value[k] for k in keys if k in value), None) for keys in _FIELDS]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            names = " / ".join("|".join(keys) for keys in _FIELDS)
            raise ValueError(f"{row.where}: needs the text fields {names}")
        pairs.append(Pair(*texts))
    if len(pairs) < 2:
        raise ValueError(f"{path}: SafetyLock needs at least 2 pairs, found {len(pairs)}")
    return pairs


_FIELDS = (QUESTION_FIELDS, SAFE_FIELDS, UNSAFE_FIELDS)


def check_inputs(
    inputs: SafetyLockInputs, settings: SafetyLockSettings
) -> tuple[Checkpoint, Checkpoint]:
    """Open both checkpoints (headers only) and refuse what SafetyLock cannot bake."""
    aligned = Checkpoint.open(inputs.aligned)
    if aligned.is_adapter:
        raise CheckpointError(f"aligned must be a model folder, not an adapter: {aligned.path}")
    base = aligned if is_adapter(inputs.finetuned) else None
    finetuned = Checkpoint.open(inputs.finetuned, base=base)
    validate_checkpoints(aligned, finetuned)
    if "attention_bias" not in finetuned.config:
        kind = finetuned.config.get("model_type", "this architecture")
        raise SettingsError(
            f"{inputs.finetuned}: SafetyLock bakes its shift as an o_proj bias, and {kind} has "
            "no attention_bias switch in config.json (Llama-like models have)"
        )
    if settings.contrast == "prompts" and (inputs.harmful is None or inputs.benign is None):
        raise SettingsError("SafetyLock --contrast prompts needs --harmful and --benign prompts")
    if inputs.pairs is None and inputs.harmful is None:
        raise SettingsError("SafetyLock needs --pairs (question, safe, unsafe) or --harmful")
    return aligned, finetuned


def safetylock(
    inputs: SafetyLockInputs,
    settings: SafetyLockSettings | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
) -> SafetyLockResult:
    """Build the lock on A, bake it into B, write the locked checkpoint to ``out``."""
    start = time.perf_counter()
    settings = settings or SafetyLockSettings()
    say = partial(report_line, progress)
    aligned, finetuned = check_inputs(inputs, settings)
    if not settings.dry_run:
        if out is None:
            raise SettingsError("SafetyLock needs --out (or --dry-run)")
        check_output(out, [aligned, finetuned], settings.overwrite)  # before any work
    model = AlignedModel(aligned, settings.device)
    samples = contrast_samples(inputs, settings, model, finetuned, say)
    say(f"head activations of the aligned model on {len(samples)} sequences")
    lock = lock_from_samples(model, samples, settings)
    report = {
        "method": "safetylock",
        "settings": settings.to_dict(),
        "samples": describe_samples(samples, inputs, settings),
        "lock": lock.describe(),
    }
    if settings.dry_run:
        report["seconds"] = round(time.perf_counter() - start, 3)
        return SafetyLockResult(None, report)
    say(f"writing {out}")
    shift = lock.displacement(settings.strength)
    path = write_locked(finetuned, aligned, shift, Path(out), report, start, settings.overwrite)
    return SafetyLockResult(path, report)


def contrast_samples(
    inputs: SafetyLockInputs,
    settings: SafetyLockSettings,
    aligned: AlignedModel,
    finetuned: Checkpoint,
    say: Callable[[str], None],
) -> list[Sample]:
    """The sequences the probes and directions read, by ``settings.contrast``."""
    if settings.contrast == "prompts":
        harmful = prompt_set(inputs.harmful, "harmful").prompts[: settings.max_pairs]
        benign = prompt_set(inputs.benign, "benign").prompts[: settings.max_pairs]
        return [Sample(p, None, 1) for p in harmful] + [Sample(p, None, 0) for p in benign]
    pairs = contrast_pairs(inputs, settings, aligned, finetuned, say)
    return [s for p in pairs for s in (Sample(p.prompt, p.safe, 1), Sample(p.prompt, p.unsafe, 0))]


def describe_samples(
    samples: list[Sample], inputs: SafetyLockInputs, settings: SafetyLockSettings
) -> dict:
    """The contrast in the report: its kind, where it came from, sequences per label."""
    if settings.contrast == "prompts":
        source = "harmful and benign prompts"
    else:
        source = str(inputs.pairs) if inputs.pairs is not None else "A's and B's replies"
    shifted_toward = sum(s.label for s in samples)
    return {
        "contrast": settings.contrast,
        "source": source,
        "toward": shifted_toward,
        "away": len(samples) - shifted_toward,
    }


def contrast_pairs(
    inputs: SafetyLockInputs,
    settings: SafetyLockSettings,
    aligned: AlignedModel,
    finetuned: Checkpoint,
    say: Callable[[str], None],
) -> list[Pair]:
    """The contrast pairs: from the file, or A's and B's greedy replies to harmful prompts."""
    if inputs.pairs is not None:
        return load_contrast_pairs(inputs.pairs)[: settings.max_pairs]
    prompts = prompt_set(inputs.harmful, "harmful").prompts[: settings.max_pairs]
    replies = {}
    # B first and freed, then A, which stays loaded for its head activations
    loaders = {
        "finetuned": lambda: _load(finetuned, aligned.checkpoint, settings.device),
        "aligned": lambda: aligned.loaded,
    }
    for role, load in loaders.items():
        say(f"{role} model's replies to {len(prompts)} harmful prompts")
        model, tokenizer = load()
        replies[role] = generate(
            model,
            tokenizer,
            prompts,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
        )
        del model
    return [
        Pair(p, safe, unsafe)
        for p, safe, unsafe in zip(prompts, replies["aligned"], replies["finetuned"], strict=True)
        if safe and unsafe
    ]


def _load(ckpt: Checkpoint, aligned: Checkpoint, device: str | None):
    if ckpt.is_adapter:
        return load_model(aligned.path, adapter=ckpt.path, dtype="float32", device=device)
    return load_model(ckpt.path, dtype="float32", device=device)


def contrast_activations(
    aligned: AlignedModel, samples: list[Sample], settings: SafetyLockSettings
):
    """A's head outputs at the last ``positions`` tokens of each sample, one label per row (1:
    toward), and A's head count: what :func:`~safealign.recover.heads.build_lock` takes."""
    model, tokenizer = aligned.loaded
    sequences = [
        reply_ids(tokenizer, s.prompt, s.reply)
        if s.reply is not None
        else encode_chat(tokenizer, [s.prompt])[0]
        for s in samples
    ]
    labels = torch.tensor([s.label for s in samples]).repeat_interleave(settings.positions)
    pad_id = ensure_pad_token(tokenizer)
    activations = head_activations(
        model, sequences, settings.positions, settings.batch_size, pad_id
    )
    return activations, labels, model.config.num_attention_heads


def lock_from_samples(aligned: AlignedModel, samples: list[Sample], settings: SafetyLockSettings):
    """The :class:`~safealign.recover.heads.HeadLock` from A's heads on ``samples``."""
    activations, labels, n_heads = contrast_activations(aligned, samples, settings)
    top = min(settings.heads, activations.shape[1] * n_heads)
    return build_lock(activations, labels, n_heads, top, settings.seed)


def o_proj_names(finetuned: Checkpoint) -> list[str]:
    """Each decoder layer's ``o_proj`` weight name, in layer order."""
    n_layers = num_decoder_layers(finetuned.config, finetuned.names())
    names = [n for n in finetuned.names() if n.endswith("self_attn.o_proj.weight")]
    by_layer = {layer_index(n): n for n in names}
    if sorted(by_layer) != list(range(n_layers)):
        raise ValueError(f"{finetuned.path}: expected one self_attn.o_proj per decoder layer")
    return [by_layer[i] for i in range(n_layers)]


def write_locked(
    finetuned: Checkpoint,
    aligned: Checkpoint,
    shift: torch.Tensor,
    out: Path,
    report: dict,
    start: float,
    overwrite: bool = False,
) -> Path:
    """B's tensors, the lock's ``o_proj`` biases (zero q/k/v biases where the config had none),
    the report and the model card, atomically into ``out``."""
    weights = o_proj_names(finetuned)
    biases = o_proj_biases([finetuned.get(name) for name in weights], shift)
    had_bias = bool(finetuned.config.get("attention_bias"))
    with CheckpointWriter(
        out,
        source=finetuned,
        inputs=[aligned],
        overwrite=overwrite,
        config_changes={"attention_bias": True},
    ) as writer:
        for name in finetuned.names():
            writer.add(name, finetuned.get(name))
        for name, bias in zip(weights, biases, strict=True):
            dtype = finetuned.dtype(name)
            bias_name = name.removesuffix(".weight") + ".bias"
            if had_bias:
                bias = bias + finetuned.get(bias_name, torch.float32)
            writer.add(bias_name, bias.to(dtype))
            if not had_bias:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    weight = name.replace("o_proj", proj)
                    rows = finetuned.shape(weight)[0]
                    writer.add(
                        weight.removesuffix(".weight") + ".bias", torch.zeros(rows, dtype=dtype)
                    )
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["peak_rss_bytes"] = peak_rss_bytes()
        write_json(writer.folder / REPORT_NAME, report)
        return writer.finish(_card(report))


def _card(report: dict) -> ModelCard:
    heads = ", ".join(f"{h['layer']}.{h['head']}" for h in report["lock"]["heads"])
    return ModelCard(
        title="SafetyLock: a fine-tuned model with its safety heads shifted",
        method="safetylock",
        summary=(
            "The fine-tuned model with a constant shift added to the outputs of "
            f"{len(report['lock']['heads'])} attention heads (layer.head: {heads}), written as "
            "o_proj biases (SafetyLock, Zhu et al., arXiv 2410.10343). The lock was built "
            f"on the aligned model, contrasting {report['samples']['contrast']} "
            f"({report['samples']['source']})."
        ),
        settings=report["settings"],
    )
