"""Regularizers built on the reference's outputs: sft, kl, epoch-kl, ldifs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safealign.retrain.divergence import trained_mask
from safealign.retrain.regularizers.base import Regularizer, Run, nll_kl_rows, nll_rows


class SFT(Regularizer):
    """Plain fine-tuning: NLL on the trained tokens (the baseline that loses alignment)."""

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        return nll.sum(), {"nll": nll.mean().item()}


class KL(Regularizer):
    """Constrained SFT: NLL + weight * KL(p_ref || p) per trained token (``reverse``:
    KL(p || p_ref)), the reference being the aligned model."""

    reference = True
    options = {"weight": "kl_weight", "direction": "kl_direction", "chunk": "kl_chunk"}

    def __init__(self, weight: float, direction: str = "forward", chunk: int = 0):
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be forward or reverse, got {direction!r}")
        self.weight, self.direction, self.chunk = float(weight), direction, int(chunk)

    def current_weight(self) -> float:
        return self.weight

    def loss(self, run: Run, inputs: dict, out, ref):
        nll, kl = nll_kl_rows(out, ref, inputs, self.direction, self.chunk)
        weight = self.current_weight()
        stats = {"nll": nll.mean().item(), "kl": kl.mean().item(), "kl_weight": weight}
        return nll.sum() + weight * kl.sum(), stats


class EpochKL(KL):
    """Seed 000: NLL + gamma^t KL(p || p_old), t the epoch (from 0), p_old the model at the
    end of the previous epoch (the aligned model during the first). The snapshot holds the
    trainable tensors only: the adapter with LoRA, one more full copy with ``--full``."""

    snapshot = True
    options = {"gamma": "gamma", "direction": "kl_direction", "chunk": "kl_chunk"}

    def __init__(self, gamma: float, direction: str = "reverse", chunk: int = 0):
        super().__init__(1.0, direction, chunk)
        self.gamma, self.epoch = float(gamma), 0

    def current_weight(self) -> float:
        return self.gamma**self.epoch

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        if epoch != self.epoch:
            run.reference.refresh()
            self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


def spread_layers(n_states: int, count: int = 5) -> tuple[int, ...]:
    """``count`` hidden-state indices spread over the decoder layers (1 .. n_states - 1)."""
    n_layers = n_states - 1
    if n_layers <= count:
        return tuple(range(1, n_states))
    return tuple(sorted({round(1 + i * (n_layers - 1) / (count - 1)) for i in range(count)}))


class LDIFS(Regularizer):
    """NLL + weight * mean over layers of ||h/|h| - h_ref/|h_ref|||^2 per trained position."""

    reference = True
    hidden = True
    options = {"weight": "ldifs_weight", "layers": "layers"}

    def __init__(self, weight: float, layers: tuple[int, ...] | None = ()):
        self.weight, self.layers = float(weight), tuple(layers or ())

    def distance(self, out, ref, inputs: dict) -> torch.Tensor:
        """Per trained position, the mean squared distance of normalised features (``[N]``)."""
        keep = trained_mask(inputs["labels"])
        layers = self.layers or spread_layers(len(out.hidden_states))
        parts = []
        for layer in layers:
            h = F.normalize(out.hidden_states[layer][:, :-1][keep].float(), dim=-1)
            g = F.normalize(ref.hidden_states[layer][:, :-1][keep].float(), dim=-1)
            parts.append(((h - g) ** 2).sum(-1))
        return torch.stack(parts).mean(0)

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        dist = self.distance(out, ref, inputs)
        stats = {"nll": nll.mean().item(), "ldifs": dist.mean().item()}
        return nll.sum() + self.weight * dist.sum(), stats
