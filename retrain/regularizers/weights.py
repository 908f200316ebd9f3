"""Weight-space regularizers: l2 toward the aligned weights, and a parameter EMA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safealign.retrain.reference import trainable
from safealign.retrain.regularizers.base import (
    Regularizer,
    RegularizerSettings,
    Run,
    nll_rows,
    per_step,
)
from safealign.settings import setting


def lora_modules(model) -> list:
    """PEFT LoRA layers of ``model`` (modules holding ``lora_A`` / ``lora_B``)."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")]


def lora_delta_norm2(model) -> torch.Tensor:
    """Sum over LoRA layers of ||s B A||_F^2 = s^2 tr((B^T B)(A A^T)): r x r Gram matrices,
    never the full ``out x in`` update."""
    total = None
    for module in lora_modules(model):
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight.float()
            b = module.lora_B[name].weight.float()
            term = module.scaling[name] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("l2: no LoRA layers found")
    return total


@dataclass
class L2Settings(RegularizerSettings):
    """l2's options."""

    regularizer = "l2"

    weight: float = setting(
        0.1, help="mu of mu ||theta - theta_A||^2.", min=0, old_name="l2_weight"
    )


class L2(Regularizer):
    """NLL + weight ||theta - theta_A||^2: through the LoRA factors, or against a copy of the
    initial weights with ``--full``."""

    settings_class = L2Settings
    settings: L2Settings

    def __init__(self, settings: L2Settings | None = None):
        super().__init__(settings)
        self.initial: dict[str, torch.Tensor] | None = None

    def setup(self, run: Run) -> None:
        if run.settings.full:
            self.initial = {n: p.detach().clone() for n, p in trainable(run.unwrapped).items()}

    def distance(self, run: Run) -> torch.Tensor:
        if self.initial is None:
            return lora_delta_norm2(run.unwrapped)
        params = trainable(run.unwrapped)
        return sum(((params[n].float() - t.float()) ** 2).sum() for n, t in self.initial.items())

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        dist = self.distance(run)
        stats = {"nll": nll.mean().item(), "l2": dist.item()}
        return nll.sum() + per_step(self.settings.weight * dist, inputs), stats


@dataclass
class EMASettings(RegularizerSettings):
    """ema's options."""

    regularizer = "ema"

    decay: float = setting(
        0.99, help="Decay of the parameter average.", min=0, max=1, old_name="ema_decay"
    )


class EMA(Regularizer):
    """Plain NLL; the trainable weights are kept as an exponential moving average of the
    iterates (decay d: avg = d avg + (1 - d) theta after each step) and written at the end."""

    settings_class = EMASettings
    settings: EMASettings

    def __init__(self, settings: EMASettings | None = None):
        super().__init__(settings)
        self.average: dict[str, torch.Tensor] = {}

    def setup(self, run: Run) -> None:
        self.average = {n: p.detach().clone() for n, p in trainable(run.unwrapped).items()}

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        return nll.sum(), {"nll": nll.mean().item()}

    @torch.no_grad()
    def after_step(self, run: Run) -> None:
        decay = self.settings.decay
        for name, param in trainable(run.unwrapped).items():
            self.average[name].mul_(decay).add_(param.detach(), alpha=1 - decay)

    @torch.no_grad()
    def finish(self, run: Run) -> None:
        for name, param in trainable(run.unwrapped).items():
            param.copy_(self.average[name])

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = state["average"]
