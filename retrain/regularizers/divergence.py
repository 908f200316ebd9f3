"""Regularizers built on the reference's outputs: sft, kl, epoch-kl, ldifs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safealign.retrain.divergence import (
    position_betas,
    reply_positions,
    token_wise_loss,
    trained_mask,
)
from safealign.retrain.regularizers.base import (
    Regularizer,
    RegularizerSettings,
    Run,
    nll_kl_rows,
    nll_rows,
)
from safealign.settings import SettingsError, setting

DIRECTIONS = ("forward", "reverse")


@dataclass
class SFTSettings(RegularizerSettings):
    """sft takes no options."""

    regularizer = "sft"


class SFT(Regularizer):
    """Plain fine-tuning: NLL on the trained tokens (the baseline that loses alignment)."""

    settings_class = SFTSettings

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        return nll.sum(), {"nll": nll.mean().item()}


def chunk_setting() -> int:
    """The KL chunk option of kl, epoch-kl and adaptive-kl."""
    return setting(
        0,
        help="Tokens per chunk of the vocabulary-wide KL (0: 2^24 floats' worth).",
        min=0,
        old_name="kl_chunk",
    )


def direction_setting(default: str, reference: str, scope: str = "") -> str:
    """The KL direction option of kl, epoch-kl and adaptive-kl, against ``reference``."""
    return setting(
        default,
        help=f"{scope}KL(p || {reference}) (reverse) or KL({reference} || p) (forward).",
        choices=DIRECTIONS,
        old_name="kl_direction",
    )


@dataclass
class KLSettings(RegularizerSettings):
    """kl's options."""

    regularizer = "kl"

    #: kl's weight and direction, chosen on validation splits of the four tiny labs
    #: (benchmarks/results/retrain_validation_*.json, README "Fidelity"): reverse lambda 0.5
    #: ranks first (mean merit 0.526 against 0.75's 0.490, 1's 0.432, 0.25's 0.130, forward
    #: 0.069): on the -prior labs, where A gives the task's answers 0.55-0.6, reverse KL at
    #: 0.5 takes harmful 100% -> 0% with the task kept, and 0.25 does not. On the plain labs A
    #: rules the task's answers out as firmly as the harmful "Sure" (lab_prior.json): no
    #: setting separates them.
    weight: float = setting(
        0.5, help="plain: lambda of NLL + lambda KL.", min=0, old_name="kl_weight"
    )
    direction: str = direction_setting("reverse", "p_ref", "plain: ")
    chunk: int = chunk_setting()
    #: plain: Qi et al.'s token-wise form leaves every lab 100% harmful, the plain ones with 2-5%
    #: task (the task's answers lie in its beta 2 window; the harmful switch is one token at 0.5).
    form: str = setting(
        "plain",
        help="plain (NLL + lambda KL) or token-wise (Qi et al. 2025, beta_t by position).",
        choices=("plain", "token-wise"),
        old_name="kl_form",
    )
    #: Qi et al. (2025), "Safety Alignment Should Be Made More Than Just a Few Tokens Deep", the
    #: constrained objective's beta_t as their code runs it: beta 0.1 with factor 5 on the first
    #: reply token and 20 on tokens 2-5 (beta_1 = 0.5, beta_2..5 = 2, beta_t = 0.1 after).
    betas: tuple[float, ...] = setting(
        (0.5, 2.0, 2.0, 2.0, 2.0, 0.1),
        help="token-wise: beta_t of reply tokens 1, 2, ...; the last for all later ones.",
        min=0,
        min_open=True,
        old_name="kl_betas",
    )

    def check(self) -> None:
        super().check()
        if not self.betas:
            raise SettingsError("kl:betas needs at least one value")


class KL(Regularizer):
    """Constrained SFT against the aligned model, in one of two forms.

    ``token-wise`` (Qi et al. 2025, Eq. 3): per trained token ``2/beta_t *
    softplus(-beta_t * log(p(y_t) / p_ref(y_t)))``, ``beta_t`` by the token's position in its
    reply (``betas``: one value per position, the last for all later ones): strong on the first
    tokens of a reply, where alignment lives, close to plain NLL after. ``plain``: NLL +
    weight * KL(p_ref || p) over the vocabulary at every trained token (``reverse``:
    KL(p || p_ref)); ``weight`` and ``direction`` apply to it only."""

    settings_class = KLSettings
    settings: KLSettings
    reference = True

    def current_weight(self) -> float:
        return self.settings.weight

    def loss(self, run: Run, inputs: dict, out, ref):
        if self.settings.form == "token-wise":
            return self.token_wise(inputs, out, ref)
        return self.plain(inputs, out, ref)

    def plain(self, inputs: dict, out, ref):
        """NLL + weight * KL at every trained token."""
        nll, kl = nll_kl_rows(out, ref, inputs, self.settings.direction, self.settings.chunk)
        weight = self.current_weight()
        stats = {"nll": nll.mean().item(), "kl": kl.mean().item(), "kl_weight": weight}
        return nll.sum() + weight * kl.sum(), stats

    def token_wise(self, inputs: dict, out, ref):
        labels = inputs["labels"]
        nll = nll_rows(out, inputs)
        ref_nll = nll_rows(ref, inputs)
        betas = position_betas(reply_positions(labels), self.settings.betas)
        loss = token_wise_loss(-nll, -ref_nll, betas)
        ratio = (ref_nll - nll).detach()
        stats = {"nll": nll.mean().item(), "log_ratio": ratio.mean().item()}
        return loss.sum(), stats


@dataclass
class EpochKLSettings(RegularizerSettings):
    """epoch-kl's options."""

    regularizer = "epoch-kl"

    gamma: float = setting(
        0.5, help="Weight gamma^epoch of KL to last epoch.", min=0, old_name="gamma"
    )
    direction: str = direction_setting("reverse", "p_old")
    chunk: int = chunk_setting()


class EpochKL(KL):
    """Seed 000: NLL + gamma^t KL(p || p_old), t the epoch (from 0), p_old the model at the
    end of the previous epoch (the aligned model during the first). The snapshot holds the
    trainable tensors only: the adapter with LoRA, one more full copy with ``--full``."""

    settings_class = EpochKLSettings
    settings: EpochKLSettings
    snapshot = True

    def __init__(self, settings: EpochKLSettings | None = None):
        super().__init__(settings)
        self.epoch = 0

    def current_weight(self) -> float:
        return self.settings.gamma**self.epoch

    def loss(self, run: Run, inputs: dict, out, ref):
        return self.plain(inputs, out, ref)

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


@dataclass
class LDIFSSettings(RegularizerSettings):
    """ldifs' options."""

    regularizer = "ldifs"

    weight: float = setting(
        1.0, help="Weight of the feature distance.", min=0, old_name="ldifs_weight"
    )
    layers: tuple[int, ...] = setting(
        (),
        help="Hidden-state indices compared.",
        min=0,
        default_text="5 spread",
        old_name="layers",
    )


class LDIFS(Regularizer):
    """NLL + weight * mean over layers of ||h/|h| - h_ref/|h_ref|||^2 per trained position."""

    settings_class = LDIFSSettings
    settings: LDIFSSettings
    reference = True
    hidden = True

    def distance(self, out, ref, inputs: dict) -> torch.Tensor:
        """Per trained position, the mean squared distance of normalised features (``[N]``)."""
        keep = trained_mask(inputs["labels"])
        layers = self.settings.layers or spread_layers(len(out.hidden_states))
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
        return nll.sum() + self.settings.weight * dist.sum(), stats
