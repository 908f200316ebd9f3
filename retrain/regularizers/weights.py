"""Weight-space regularizers: l2 toward the aligned weights, and a parameter EMA."""

from __future__ import annotations

from collections.abc import Iterator
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


def lora_layers(model) -> dict[str, tuple]:
    """``"module:adapter"`` -> (PEFT LoRA layer, adapter name) for each active adapter."""
    return {
        f"{name}:{adapter}": (module, adapter)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "lora_B")
        for adapter in module.active_adapters
        if adapter in module.lora_A
    }


def lora_delta_norm2(model) -> torch.Tensor:
    """Sum over LoRA layers of ||s B A||_F^2 = s^2 tr((B^T B)(A A^T)): r x r Gram matrices,
    never the full ``out x in`` update."""
    total = None
    for module, name in lora_layers(model).values():
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


def lora_delta(module, adapter: str) -> torch.Tensor:
    """The layer's update s B A in float32 (``out x in``), detached."""
    a = module.lora_A[adapter].weight.detach().float()
    b = module.lora_B[adapter].weight.detach().float()
    return module.scaling[adapter] * (b @ a)


@torch.no_grad()
def set_delta(module, adapter: str, delta: torch.Tensor, merge: bool) -> float:
    """Make the layer's update ``delta``: the LoRA factors take its best rank-r approximation
    (truncated SVD, the singular values split evenly between B and A); with ``merge`` the rest
    is added to the frozen base weight, so the merged weight is exact. Returns the squared
    Frobenius norm of that rest."""
    from peft.utils.other import transpose

    rank, scale = module.r[adapter], module.scaling[adapter]
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    root = sigma[:rank].sqrt()
    b, a = u[:, :rank] * root / scale**0.5, root[:, None] * vh[:rank] / scale**0.5
    module.lora_B[adapter].weight.copy_(b)
    module.lora_A[adapter].weight.copy_(a)
    rest = delta - scale * (b @ a)
    if merge:
        weight = module.get_base_layer().weight
        weight.add_(transpose(rest, module.fan_in_fan_out).to(weight.dtype))
    return float((rest**2).sum())


class EMA(Regularizer):
    """Plain NLL; the weights are kept as an exponential moving average of the iterates
    (decay d: avg = d avg + (1 - d) theta after each step) and written at the end.

    With LoRA the average is taken of each layer's update s B A, which is the average of the
    model's weights (averaging A and B apart is not: the product of averages is not the average
    of products). It is held dense (float32, the size of the adapted weights) and may exceed
    rank r: the adapter written holds its best rank-r approximation (``metrics
    ["ema_rank_residual"]``: the share of its Frobenius norm left out); ``--merge`` writes it
    exactly. ``--full`` averages the weights themselves."""

    settings_class = EMASettings
    settings: EMASettings

    def __init__(self, settings: EMASettings | None = None):
        super().__init__(settings)
        self.average: dict[str, torch.Tensor] = {}

    def current(self, run: Run) -> Iterator[tuple[str, torch.Tensor]]:
        """What is averaged, one tensor at a time: each LoRA layer's update, or else the
        trainable weights."""
        layers = lora_layers(run.unwrapped)
        if layers:
            return ((key, lora_delta(*layer)) for key, layer in layers.items())
        return ((n, p.detach()) for n, p in trainable(run.unwrapped).items())

    def setup(self, run: Run) -> None:
        self.average = {n: t.clone() for n, t in self.current(run)}

    def loss(self, run: Run, inputs: dict, out, ref):
        nll = nll_rows(out, inputs)
        return nll.sum(), {"nll": nll.mean().item()}

    @torch.no_grad()
    def after_step(self, run: Run) -> None:
        decay = self.settings.decay
        for name, value in self.current(run):
            self.average[name].mul_(decay).add_(value, alpha=1 - decay)

    @torch.no_grad()
    def finish(self, run: Run) -> None:
        layers = lora_layers(run.unwrapped)
        if not layers:
            for name, param in trainable(run.unwrapped).items():
                param.copy_(self.average[name])
            return
        rest = sum(set_delta(*layers[k], self.average[k], run.settings.merge) for k in layers)
        total = sum(float((t**2).sum()) for t in self.average.values())
        run.metrics["ema_rank_residual"] = (rest / total) ** 0.5 if total else 0.0

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.average = state["average"]
