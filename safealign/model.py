"""Load causal LMs and their tokenizers, and the one pad-token rule."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from safealign.chat import chat_prompt as chat_prompt  # re-exported: tests import it
from safealign.checkpoint import Checkpoint, CheckpointError, check_finite_model, pickle_allowed
from safealign.checkpoint.hub import resolve_checkpoint
from safealign.paths import has_tokenizer

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a user-facing dtype name into a torch dtype ("auto" passes through)."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}") from None


def load_model(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
):
    """Load a causal LM and its tokenizer from a local folder or hub id, optionally with a PEFT
    adapter (a folder or hub id too; see :mod:`safealign.checkpoint.hub`).

    Weights are read from safetensors (pickles only inside ``allow_pickle``, and then with
    ``weights_only``); remote code is never run.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path = resolve_checkpoint(path)
    adapter = resolve_checkpoint(adapter) if adapter is not None else None
    # Headers first (truncated, lying, pickle-only, an adapter on the wrong base), then the
    # weights, checked finite. use_safetensors=None: safetensors first, else allowed pickles.
    Checkpoint.open(adapter, base=path) if adapter is not None else Checkpoint.open(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, use_safetensors=None if pickle_allowed() else True
    )
    check_finite_model(model, path)
    tok_source = adapter if adapter is not None and has_tokenizer(adapter) else path
    if Path(tok_source).is_dir() and not has_tokenizer(tok_source):
        raise CheckpointError(
            f"no tokenizer (tokenizer.json or tokenizer_config.json): {tok_source}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    if device is not None:
        model = model.to(device)
    model.eval()
    ensure_pad_token(tokenizer)
    return model, tokenizer


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def ensure_pad_token(tokenizer) -> int:
    """The one pad-token rule: a tokenizer without a pad token pads with EOS. Returns its id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id
