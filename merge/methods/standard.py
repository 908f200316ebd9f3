"""The merges release pipelines already run, with mergekit's parameters and defaults.

Differences from mergekit 0.1.5, on purpose:
- everything is computed in fp32 (mergekit computes in the config's ``dtype``);
- TIES keeps every entry whose magnitude reaches the k-th largest (mergekit keeps exactly k;
  they differ only on exact ties);
- DARE's random masks come from a generator seeded per tensor by ``--seed``, the tensor name and
  the model id, so a merge is reproducible and independent of tensor order (mergekit draws from
  torch's global RNG); ``int8_mask`` is accepted and has no effect (a memory saving we do not need
  because masks are built for one tensor at a time).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from safealign.merge.methods.base import (
    METHODS,
    MergeMethod,
    MergeParams,
    Param,
    boolean,
    density,
    number,
)
from safealign.merge.methods.sparsify import dare_drop, magnitude_threshold, tensor_generator

WEIGHT = Param("weight", required=True, check=number, help="coefficient of this model")


@METHODS.register("linear")
class Linear(MergeMethod):
    """Weighted average of the models: sum(w_i x_i) / sum(w_i) (without ``normalize``: the sum).

    Models are read and added one at a time: memory does not grow with their number.
    """

    summary = "weighted average of whole weights"
    parameters = (Param("normalize", True, check=boolean, help="divide by the sum of weights"),)
    tensor_parameters = (WEIGHT,)

    def merge(self, name, tensors, base, params):
        weights = {m: float(params.of(m, "weight")) for m in tensors}
        out = None
        for model, weight in weights.items():
            x = tensors[model]
            out = x.mul(weight) if out is None else out.add_(x, alpha=weight)
            del x
        total = sum(weights.values())
        if params.global_["normalize"] and abs(total) > 1e-8:
            out.div_(total)
        return out


class GeneralizedTaskArithmetic(MergeMethod):
    """base + lambda * mix(w_i * sparsify(x_i - base)), the family mergekit calls GTA.

    ``sparsify`` is magnitude top-k (TIES) or DARE's random drop; ``mix`` is a plain sum or the
    TIES sign election (keep entries agreeing with the sign of the weighted sum).
    With ``normalize`` the mix is divided by the sum of the (elected) weights.
    """

    requires_base = True
    sparsify: str | None = None  # "magnitude" or "random"
    elect_sign: bool = False
    default_normalize: bool = False
    default_rescale: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.parameters = (
            Param("normalize", cls.default_normalize, check=boolean),
            Param("rescale", cls.default_rescale, check=boolean, help="DARE: keep the L1 norm"),
            Param("lambda", 1.0, check=number, help="scale of the merged task vector"),
            Param("int8_mask", False, check=boolean, help="accepted for mergekit; no effect"),
        )
        cls.tensor_parameters = (
            WEIGHT,
            Param("density", 1.0, check=density, help="share of each task vector kept"),
        )

    def merge(self, name, tensors, base, params):
        models = list(tensors)
        if not models:
            return base
        weights = {m: float(params.of(m, "weight")) for m in models}
        thresholds: dict[str, torch.Tensor] = {}

        def weighted_delta(model: str) -> torch.Tensor:
            delta = self._sparse_delta(name, model, tensors[model] - base, params, thresholds)
            return delta.mul_(weights[model])

        mixed = torch.zeros_like(base)
        if self.elect_sign:
            # Two streaming passes keep memory flat in the number of models: the first sums
            # the weighted deltas to elect each entry's sign, the second re-reads each model
            # and adds the entries that agree (masks are recomputed identically).
            for model in models:
                mixed.add_(weighted_delta(model))
            majority_positive = mixed >= 0
            mixed.zero_()
            divisor = torch.zeros_like(base)
            for model in models:
                delta = weighted_delta(model)
                agree = torch.where(majority_positive, delta > 0, delta < 0)
                mixed.add_(delta.mul_(agree))
                divisor.add_(agree, alpha=weights[model])
            divisor[divisor == 0] = 1
        else:
            for model in models:
                mixed.add_(weighted_delta(model))
            total = sum(weights.values())
            divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, device=base.device)
        if params.global_["normalize"]:
            mixed.div_(divisor)
        return mixed.mul_(float(params.global_["lambda"])).add_(base)

    def _sparse_delta(self, name, model, delta, params, thresholds) -> torch.Tensor:
        keep = float(params.of(model, "density"))
        if self.sparsify == "magnitude" and keep < 1:
            if model not in thresholds:
                thresholds[model] = magnitude_threshold(delta, keep)
            return delta.mul_(delta.abs() >= thresholds[model])
        if self.sparsify == "random":
            generator = tensor_generator(params.seed, name, model)
            return dare_drop(delta, keep, rescale=params.global_["rescale"], generator=generator)
        return delta


@METHODS.register("task_arithmetic")
class TaskArithmetic(GeneralizedTaskArithmetic):
    summary = "base + sum of weighted task vectors"


@METHODS.register("ties")
class Ties(GeneralizedTaskArithmetic):
    summary = "magnitude-pruned task vectors, sign election, normalized"
    sparsify = "magnitude"
    elect_sign = True
    default_normalize = True


@METHODS.register("dare_linear")
class DareLinear(GeneralizedTaskArithmetic):
    summary = "randomly dropped, rescaled task vectors, summed"
    sparsify = "random"
    default_rescale = True


@METHODS.register("dare_ties")
class DareTies(GeneralizedTaskArithmetic):
    summary = "randomly dropped, rescaled task vectors with sign election"
    sparsify = "random"
    elect_sign = True
    default_rescale = True


@METHODS.register("slerp")
class Slerp(MergeMethod):
    """Spherical interpolation from the base (t=0) to the other model (t=1), row by row.

    Like mergekit 0.1.5, each row (leading axis) is interpolated on its own sphere; rows whose
    normalized dot product exceeds 0.9995 in magnitude fall back to linear interpolation, and norms
    below 1e-8 are not divided by. A 1-D tensor has rows of one element, so it is interpolated
    linearly (mergekit before 0.1.5 slerped each tensor as one vector).
    """

    summary = "spherical interpolation between the base and one model"
    requires_base = True
    n_models = 1
    parameters = (Param("t", required=True, check=number, help="0: base, 1: the other"),)
    dot_threshold = 0.9995
    eps = 1e-8

    def merge(self, name, tensors: Mapping[str, torch.Tensor], base, params: MergeParams):
        (other,) = tensors.values()
        t = float(params.global_["t"])
        a = base.reshape(base.shape[0], -1) if base.dim() else base.reshape(1, 1)
        b = other.reshape(a.shape)
        norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
        norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
        norm_a = torch.where(norm_a > self.eps, norm_a, 1.0)
        norm_b = torch.where(norm_b > self.eps, norm_b, 1.0)
        dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
        linear = dot.abs() > self.dot_threshold
        theta = torch.acos(torch.where(linear, 0.0, dot))
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        return (coef_a * a + coef_b * b).reshape(base.shape)
