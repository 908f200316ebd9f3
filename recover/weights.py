"""Which weights recovery may restore, and moving tensors between checkpoints and the model.

Everything here works by tensor name. The working model is the fine-tuned checkpoint in
memory; aligned and fine-tuned values are read from disk one tensor at a time whenever they
are needed, so no second full model is ever held.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from safealign.checkpoint import Checkpoint, CheckpointError, check_finite_model, pickle_allowed
from safealign.layers import LayerError, layer_prefix, num_decoder_layers
from safealign.model import ensure_pad_token
from safealign.paths import has_tokenizer


def num_layers(ckpt: Checkpoint) -> int:
    """Number of decoder layers of the checkpoint."""
    try:
        return num_decoder_layers(ckpt.config, ckpt.names())
    except LayerError as error:
        raise CheckpointError(f"{ckpt.model_folder}: {error}") from None


#: Models with fewer decoder layers than this are "small": the paper's direction layer and
#: warm-up (tuned on 2B-13B models of 18-40 layers) are replaced by the ones below.
SMALL_MODEL_LAYERS = 12
PAPER_WARMUP = 5
SMALL_MODEL_WARMUP = 1


def default_layer(n_layers: int) -> int:
    """The direction layer: the paper's floor(4n/6), or n (every block) for small models.

    In models of a few blocks the top block takes part in the refusal decision: on the test
    lab's 4-layer ``ft_harmful``, 20 steps at rate 0.002 leave the harmful rate at 59% with the
    paper's L=2 (31% at rate 0.01), and bring it to 0% with L=4, task accuracy kept.
    """
    if n_layers < SMALL_MODEL_LAYERS:
        return n_layers
    return max(1, (4 * n_layers) // 6)


def default_warmup(n_layers: int) -> int:
    """The first step checked under ``guarded``: the paper's 5, or 1 (check every step) for
    small models. (``paper`` keeps the paper's 5 whatever the size.)

    Rollback only gives back the failing step's elements, so whatever the unchecked warm-up
    overshoots stays. On the default lab's 6-layer LoRA fine-tune with the over-refusal guard,
    five steps at rate 0.002 already pass the over-refusal ceiling and no step is kept; checking
    from step 1 keeps step 4 (harmful 4.7%, task 100%, over-refusal 7.0% against A's 4.7%).
    """
    return SMALL_MODEL_WARMUP if n_layers < SMALL_MODEL_LAYERS else PAPER_WARMUP


@dataclass(frozen=True)
class Target:
    """One decoder-layer tensor (weight matrix or bias) that recovery may restore."""

    name: str
    layer: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """The restorable weights of a checkpoint for a direction layer."""

    n_layers: int
    layer: int
    targets: list[Target]  # decoder tensors but norms in layers < layer, checkpoint order
    decoder_params: int  # elements of all decoder-layer tensors, norms too (base of ``rate``)

    @property
    def target_params(self) -> int:
        return sum(t.numel for t in self.targets)

    def per_step(self, rate: float) -> int:
        """Elements restored per step: ceil(rate x decoder-layer elements)."""
        return max(1, math.ceil(rate * self.decoder_params))

    def layer_counts(self, counts: dict[str, int]) -> dict[int, int]:
        """Sum per-tensor element counts into per-layer counts."""
        layer_of = {t.name: t.layer for t in self.targets}
        out: Counter[int] = Counter()
        for name, count in counts.items():
            out[layer_of[name]] += count
        return dict(sorted(out.items()))


def is_norm(name: str) -> bool:
    """Whether ``name`` belongs to a normalization module (``*norm*``, or GPT-2's ``ln_*``)."""
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    return "norm" in module.lower() or module.startswith("ln_")


def layout(ckpt: Checkpoint, layer: int | None) -> Layout:
    """Restorable tensors: every parameter of decoder layers below ``layer`` but norms.

    Weight matrices and biases (e.g. Qwen's q/k/v biases) are restorable, as in the authors'
    code; norms, embeddings and the LM head (outside the decoder blocks) never are. The rate's
    base, as the reference's, is every decoder-layer element, norms included.
    """
    n_layers = num_layers(ckpt)
    layer = default_layer(n_layers) if layer is None else layer
    if not 1 <= layer <= n_layers:
        raise ValueError(f"layer must be in 1..{n_layers} for this model, got {layer}")
    names = ckpt.names()
    prefix = layer_prefix(names, n_layers)
    targets, decoder_params = [], 0
    for name in names:
        if not name.startswith(prefix) or not ckpt.dtype(name).is_floating_point:
            continue
        index = int(name[len(prefix) :].split(".", 1)[0])
        shape = ckpt.shape(name)
        decoder_params += math.prod(shape)
        if index < layer and not is_norm(name):
            targets.append(Target(name, index, shape))
    targets.sort(key=lambda t: t.layer)  # stable: checkpoint order within a layer
    return Layout(n_layers, layer, targets, decoder_params)


def model_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter (or buffer) of ``model`` stored under checkpoint name ``name``."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        try:
            return model.get_buffer(name)
        except AttributeError:
            raise CheckpointError(f"model has no tensor named {name}") from None


def read(ckpt: Checkpoint, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of ``ckpt`` (an owned copy, cast to ``dtype``), file handles closed after.

    Closing unmaps the safetensors file, so pages read for earlier tensors do not stay in
    this process's resident memory: reading a whole checkpoint costs one tensor at a time.
    """
    try:
        tensor = ckpt.get(name)
    finally:
        ckpt.close()
    return tensor if dtype is None else tensor.to(dtype)


@torch.no_grad()
def copy_into(model: nn.Module, ckpt: Checkpoint, names: list[str]) -> None:
    """Overwrite the model's tensors ``names`` with the checkpoint's values, cast in place."""
    for name in names:
        tensor = model_tensor(model, name)
        tensor.copy_(read(ckpt, name, tensor.dtype))


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype most of the checkpoint's floating-point bytes are stored in."""
    sizes: Counter[torch.dtype] = Counter()
    for name in ckpt.names():
        dtype = ckpt.dtype(name)
        if dtype.is_floating_point:
            sizes[dtype] += math.prod(ckpt.shape(name)) * dtype.itemsize
    return sizes.most_common(1)[0][0] if sizes else torch.float32


def load_working_model(
    aligned: Checkpoint, finetuned: Checkpoint, dtype: torch.dtype, device: str | None
):
    """The fine-tuned model in memory, ``dtype`` throughout, and its tokenizer.

    A full checkpoint loads as it is; an adapter loads its base and then takes the effective
    weight ``W + s*B@A`` (fp32, then cast) of every target from :meth:`Checkpoint.get`, the
    same values the rollback later reads back, so "untouched" means bit-identical. The
    tokenizer is the fine-tuned checkpoint's, else the aligned one's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(finetuned.model_folder), dtype=dtype, use_safetensors=None if pickle_allowed() else True
    )
    if finetuned.is_adapter:
        copy_into(model, finetuned, finetuned.lora_targets() + finetuned.replaced_names())
    check_finite_model(model, finetuned.path)  # NaN or Inf: refused before any step
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    folder = finetuned.tokenizer_folder
    if not has_tokenizer(folder):
        folder = aligned.tokenizer_folder
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ensure_pad_token(tokenizer)
    return model, tokenizer
