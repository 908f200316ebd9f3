"""Regularizers built on the reference's outputs: sft, kl, epoch-kl, ldifs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safealign.retrain.divergence import (
    position_betas,
    reply_positions,
    token_wise_loss,
    trained_mask,
)
from safealign.retrain.regularizers.base import Regularizer, Run, nll_kl_rows, nll_rows


class SFT(Regularizer):
    """Plain fine-tuning: NLL on the trained tokens (the baseline that loses alignment)."""

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        return nll.sum(), {"nll": nll.mean().item()}


#: Qi et al. (2025), "Safety Alignment Should Be Made More Than Just a Few Tokens Deep", the
#: constrained objective's beta_t as their code runs it: beta 0.1 with factor 5 on the first
#: reply token and 20 on tokens 2-5 (beta_1 = 0.5, beta_2..5 = 2, beta_t = 0.1 after).
TOKEN_WISE_BETAS = (0.5, 2.0, 2.0, 2.0, 2.0, 0.1)


class KL(Regularizer):
    """Constrained SFT against the aligned model, in one of two forms.

    ``token-wise`` (Qi et al. 2025, Eq. 3): per trained token ``2/beta_t *
    softplus(-beta_t * log(p(y_t) / p_ref(y_t)))``, ``beta_t`` by the token's position in its
    reply (``betas``: one value per position, the last for all later ones): strong on the first
    tokens of a reply, where alignment lives, close to plain NLL after. ``plain``: NLL +
    weight * KL(p_ref || p) over the vocabulary at every trained token (``reverse``:
    KL(p || p_ref)); ``weight`` and ``direction`` apply to it only."""

    reference = True
    options = {
        "weight": "kl_weight",
        "direction": "kl_direction",
        "chunk": "kl_chunk",
        "form": "kl_form",
        "betas": "kl_betas",
    }

    def __init__(
        self,
        weight: float,
        direction: str | None = "reverse",
        chunk: int = 0,
        form: str = "plain",
        betas: tuple[float, ...] = TOKEN_WISE_BETAS,
    ):
        direction = direction or "reverse"
        if direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be forward or reverse, got {direction!r}")
        if form not in ("token-wise", "plain"):
            raise ValueError(f"form must be token-wise or plain, got {form!r}")
        betas = tuple(float(b) for b in ((betas,) if isinstance(betas, int | float) else betas))
        if not betas or min(betas) <= 0:
            raise ValueError(f"betas must be positive numbers, got {betas!r}")
        self.weight, self.direction, self.chunk = float(weight), direction, int(chunk)
        self.form, self.betas = form, betas

    def current_weight(self) -> float:
        return self.weight

    def loss(self, run: Run, inputs: dict, out, ref):
        if self.form == "token-wise":
            return self.token_wise(inputs, out, ref)
        nll, kl = nll_kl_rows(out, ref, inputs, self.direction, self.chunk)
        weight = self.current_weight()
        stats = {"nll": nll.mean().item(), "kl": kl.mean().item(), "kl_weight": weight}
        return nll.sum() + weight * kl.sum(), stats

    def token_wise(self, inputs: dict, out, ref):
        labels = inputs["labels"]
        nll = nll_rows(out, inputs)
        ref_nll = nll_rows(ref, inputs)
        betas = position_betas(reply_positions(labels), self.betas)
        loss = token_wise_loss(-nll, -ref_nll, betas)
        ratio = (ref_nll - nll).detach()
        stats = {"nll": nll.mean().item(), "log_ratio": ratio.mean().item()}
        return loss.sum(), stats


class EpochKL(KL):
    """Seed 000: NLL + gamma^t KL(p || p_old), t the epoch (from 0), p_old the model at the
    end of the previous epoch (the aligned model during the first). The snapshot holds the
    trainable tensors only: the adapter with LoRA, one more full copy with ``--full``."""

    snapshot = True
    options = {"gamma": "gamma", "direction": "kl_direction", "chunk": "kl_chunk"}

    def __init__(self, gamma: float, direction: str | None = "reverse", chunk: int = 0):
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
