"""Decoder layers, found once for every command: in a loaded model by structure, in a
checkpoint by its config and tensor names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from torch import nn

_NUMBERED = re.compile(r"^(?P<prefix>.*?\.)(?P<index>\d+)\.")
_LAYERS = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LayerError(ValueError):
    """No decoder layers could be found."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-like model, found by structure.

    The decoder stack is the longest ``nn.ModuleList`` whose members all share one class;
    this finds ``model.layers`` (Llama, Qwen2, Mistral, Gemma, Phi-3), ``gpt_neox.layers``
    and PEFT-wrapped variants without a table of attribute names.
    """
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise LayerError(f"{type(model).__name__}: no decoder-layer list found")
    return best


def num_decoder_layers(config: Mapping, names: Iterable[str] = ()) -> int:
    """Decoder layers of a checkpoint: ``num_hidden_layers`` of its (text) config, else
    counted from ``layers.N.`` tensor names."""
    text = config.get("text_config") or config
    n = text.get("num_hidden_layers")
    if isinstance(n, int) and n >= 1:
        return n
    indices = {i for i in map(layer_index, names) if i is not None}
    if not indices:
        raise LayerError("config has no num_hidden_layers and no tensor is in a decoder layer")
    return max(indices) + 1


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``...layers.N....``), else None."""
    match = _LAYERS.search(name)
    return int(match[1]) if match else None


def layer_prefix(names: Iterable[str], n_layers: int) -> str:
    """The name prefix of the decoder blocks (e.g. ``model.layers.``): the prefix followed by
    exactly the indices 0..n_layers-1."""
    seen: dict[str, set[int]] = {}
    for name in names:
        match = _NUMBERED.match(name)
        if match:
            seen.setdefault(match["prefix"], set()).add(int(match["index"]))
    for prefix, indices in seen.items():
        if indices == set(range(n_layers)):
            return prefix
    raise LayerError(f"no decoder-layer tensors numbered 0..{n_layers - 1} found")
