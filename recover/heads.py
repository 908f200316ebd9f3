"""Attention-head activations, per-head probes and the SafetyLock displacement.

SafetyLock (Zhu et al., arXiv 2410.10343; zhu-minjun/SafetyLock) works on each attention
head's output before ``o_proj`` (the ``head_out`` the authors trace). From the aligned model's
activations on a harmful question answered safely and unsafely it

1. fits one logistic-regression probe per (layer, head) on a random 60/40 split of the
   samples and ranks heads by the mean of validation and training accuracy;
2. takes, for each of the top heads, the mass-mean direction (mean over safe samples minus
   mean over unsafe samples, unit length) and the standard deviation of every sample's
   projection on it;
3. shifts each chosen head's output by ``strength · std · direction``. A constant shift before
   ``o_proj`` is the bias ``W_o · shift`` on its output, so the lock bakes into a checkpoint.

A sample is one of the last ``positions`` tokens of a reply (the authors use 5), the reply
following the question in the chat template.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from safealign.chat import encode_chat, left_pad
from safealign.layers import decoder_layers
from safealign.model import model_device

#: Share of samples the head probes are validated on (the authors' 60/40 split).
PROBE_VALIDATION_SHARE = 0.4


def o_projections(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention output projection (``self_attn.o_proj``)."""
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        attention = getattr(layer, "self_attn", None)
        projection = getattr(attention, "o_proj", None)
        if projection is None:
            raise ValueError(f"decoder layer {index} has no self_attn.o_proj")
        found.append(projection)
    return found


def reply_ids(tokenizer, prompt: str, reply: str) -> list[int]:
    """The prompt in the chat template (assistant turn opened), then the reply's tokens (no
    end-of-turn: the samples are the reply's own last tokens)."""
    prompt_ids = encode_chat(tokenizer, [prompt])[0]
    return prompt_ids + tokenizer(reply, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def head_activations(
    model: nn.Module, sequences: Sequence[Sequence[int]], positions: int, batch_size: int, pad_id
) -> torch.Tensor:
    """Inputs of every layer's ``o_proj`` at the last ``positions`` tokens of each sequence:
    ``[len(sequences) * positions, layers, heads * head_dim]`` in fp32, sequence-major."""
    projections = o_projections(model)
    device = model_device(model)
    captured: list[torch.Tensor | None] = [None] * len(projections)

    def recorder(index: int):
        def hook(_module, inputs):
            captured[index] = inputs[0][:, -positions:, :].float().cpu()

        return hook

    handles = [p.register_forward_pre_hook(recorder(i)) for i, p in enumerate(projections)]
    rows = []
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = left_pad(sequences[start : start + batch_size], pad_id, device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
            stacked = torch.stack([c for c in captured if c is not None], dim=2)
            rows.append(stacked.reshape(-1, len(projections), stacked.shape[-1]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


def fit_probes(
    features: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """One L2-regularised logistic regression per probe, all at once.

    ``features`` ``[probes, samples, dim]``, ``labels`` ``[samples]`` in {0, 1}. Each probe
    minimises ``Σ log(1 + exp(-y'(x·w + b))) + ½‖w‖²`` (y' = ±1; scikit-learn's default
    ``LogisticRegression``, C = 1, the intercept not penalised), by L-BFGS in fp64. The
    objectives are independent, so their sum is minimised jointly. Returns ``(w, b)``.
    """
    x = features.double()
    sign = labels.double() * 2 - 1
    weights = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(x.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias],
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("psd,pd->ps", x, weights) + bias[:, None]
        loss = nn.functional.softplus(-sign * logits).sum() + 0.5 * (weights**2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return weights.detach(), bias.detach()


def probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Each probe's accuracy ``[probes]`` on ``features`` ``[probes, samples, dim]``."""
    logits = torch.einsum("psd,pd->ps", features.double(), weights) + bias[:, None]
    return ((logits > 0).long() == labels.long()[None, :]).double().mean(dim=1)


@dataclass(frozen=True)
class HeadLock:
    """A SafetyLock: the chosen heads, their unit directions and projection spreads.

    ``directions`` ``[layers, heads, head_dim]`` (zero for heads not chosen), ``spreads``
    ``[layers, heads]``, ``accuracies`` ``[layers, heads]`` (each probe's mean of validation
    and training accuracy), ``chosen`` the (layer, head) pairs in rank order.
    """

    directions: torch.Tensor
    spreads: torch.Tensor
    accuracies: torch.Tensor
    chosen: tuple[tuple[int, int], ...]

    def displacement(self, strength: float) -> torch.Tensor:
        """The shift of each layer's ``o_proj`` input: ``[layers, heads * head_dim]``."""
        shift = strength * self.spreads[:, :, None] * self.directions
        return shift.reshape(shift.shape[0], -1)

    def describe(self) -> dict:
        """The chosen heads with their probe accuracy and spread, for the report."""
        return {
            "heads": [
                {
                    "layer": layer,
                    "head": head,
                    "probe_accuracy": round(float(self.accuracies[layer, head]), 4),
                    "spread": round(float(self.spreads[layer, head]), 6),
                }
                for layer, head in self.chosen
            ]
        }


def build_lock(
    activations: torch.Tensor, labels: torch.Tensor, n_heads: int, top: int, seed: int
) -> HeadLock:
    """The lock from ``activations`` ``[samples, layers, heads * head_dim]`` labelled 1 (safe
    reply) or 0 (unsafe reply): probes on a seeded 60/40 split rank the heads, the ``top``
    first get their mass-mean direction."""
    samples, layers, width = activations.shape
    per_head = activations.reshape(samples, layers * n_heads, width // n_heads).transpose(0, 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(samples, generator=generator)
    n_train = int(samples * (1 - PROBE_VALIDATION_SHARE))
    train, val = order[:n_train], order[n_train:]
    weights, bias = fit_probes(per_head[:, train], labels[train])
    accuracy = (
        probe_accuracy(per_head[:, val], labels[val], weights, bias)
        + probe_accuracy(per_head[:, train], labels[train], weights, bias)
    ) / 2
    ranked = torch.sort(accuracy, descending=True, stable=True).indices[:top]
    safe = labels.bool()
    directions = per_head[:, safe].mean(dim=1) - per_head[:, ~safe].mean(dim=1)
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    spreads = torch.einsum("psd,pd->ps", per_head, directions).std(dim=1, unbiased=False)
    keep = torch.zeros(layers * n_heads, dtype=torch.bool)
    keep[ranked] = True
    directions = directions * keep[:, None]
    spreads = spreads * keep
    chosen = tuple((int(i) // n_heads, int(i) % n_heads) for i in ranked)
    return HeadLock(
        directions.reshape(layers, n_heads, -1).float(),
        spreads.reshape(layers, n_heads).float(),
        accuracy.reshape(layers, n_heads).float(),
        chosen,
    )


def o_proj_biases(o_weights: Sequence[torch.Tensor], displacement: torch.Tensor) -> list:
    """The bias each layer's ``o_proj`` needs to add ``displacement`` to its input:
    ``W_o · shift`` per layer, in fp32."""
    return [w.float() @ shift.float() for w, shift in zip(o_weights, displacement, strict=True)]


@contextmanager
def shifted(model: nn.Module, displacement: torch.Tensor) -> Iterator[None]:
    """Run ``model`` with each layer's ``o_proj`` input shifted (the authors' runtime form,
    used to choose a strength and to test the baked checkpoint against)."""

    def adder(shift: torch.Tensor):
        def hook(_module, inputs):
            return (inputs[0] + shift.to(inputs[0].dtype), *inputs[1:])

        return hook

    device = model_device(model)
    handles = [
        p.register_forward_pre_hook(adder(shift.to(device)))
        for p, shift in zip(o_projections(model), displacement, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
