"""Rollback: give back to the fine-tuned model some of one step's restored elements.

The elements are chosen by the gradient of -cos(mean last-token state on task prompts,
fine-tuned centroid): among the step's restored elements, those where a descent step on this
loss moves back toward the fine-tuned value, the largest |g| first (ties: earlier elements in
visiting order). The gradient is gathered by hooks on the parameters at the step's indices
only, so no second gradient buffer is ever allocated and the accumulated harmful-direction
gradient stays untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from safealign.checkpoint import Checkpoint
from safealign.recover.direction import cosine_backward
from safealign.recover.select import stable_top
from safealign.recover.weights import read


def gathered_gradients(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    layer: int,
    centroid: torch.Tensor,
    picked: dict[str, torch.Tensor],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Gradient of the centroid loss at ``picked`` flat indices per tensor (fp32, summed over
    batches). Parameter ``.grad`` buffers are left exactly as they were."""
    params = {name: model.get_parameter(name) for name in picked}
    gathered = {name: torch.zeros(idx.numel()) for name, idx in picked.items()}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    handles = []

    def make_hook(name: str):
        index = picked[name].to(params[name].device)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            gathered[name] += grad.reshape(-1)[index].float().cpu()
            return torch.zeros_like(grad)  # accumulate nothing into .grad

        return hook

    try:
        model.requires_grad_(False)
        for name, param in params.items():
            param.requires_grad_(True)
            handles.append(param.register_hook(make_hook(name)))
        cosine_backward(model, tokenizer, prompts, layer, centroid, batch_size)
    finally:
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(previous[name])
    return gathered


def choose_rollback(
    model: nn.Module,
    finetuned: Checkpoint,
    picked: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    share: float,
    of_agreeing: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pick elements to roll back, the largest |g| first; returns name -> (index, B values).

    Only elements where sign(g) == sign(w - w_finetuned) qualify (a descent step moves them
    toward the fine-tuned value). ``of_agreeing``: ceil(share x qualifying) are taken (the
    authors' rule); otherwise ceil(share x all of ``picked``), or all qualifying if fewer.
    """
    names = list(picked)
    scores, finetuned_values = [], []
    for name in names:
        param = model.get_parameter(name)
        index = picked[name]
        b = read(finetuned, name, param.dtype).reshape(-1)[index].float()
        w = param.detach().reshape(-1)[index.to(param.device)].float().cpu()
        g = grads[name]
        agree = (w != b) & (torch.sign(g) == torch.sign(w - b))
        scores.append(torch.where(agree, g.abs(), torch.full_like(g, -1.0)))
        finetuned_values.append(b)
    flat = torch.cat(scores) if scores else torch.empty(0)
    agreeing = int((flat >= 0).sum())
    base = agreeing if of_agreeing else flat.numel()
    count = min(math.ceil(share * base), agreeing)
    chosen = stable_top(flat, count)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for name, values in zip(names, finetuned_values, strict=True):
        size = picked[name].numel()
        local = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        if local.numel():
            out[name] = (picked[name][local], values[local])
        offset += size
    return out
