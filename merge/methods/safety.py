"""Safety-aware merges of a fine-tuned model B with its aligned origin A.

Inputs are keyed by role: the base tensor is the aligned model A's; ``tensors`` holds
``finetuned`` (B) and, per method, ``unaligned`` (U, the model before alignment), ``safety``
(S, a safety model: a LoRA on A, or A itself when absent) and ``harmful_model`` (H, A fine-tuned
on harmful data: RESTA's "unaligned" model). A role's value is a full weight (``Tensor``) or a
LoRA update on A (:class:`LowRank`).

Layer-wise methods score each layer weight (every 2-D weight inside a decoder layer: q, k, v, o,
gate, up, down projections) by ρ = cos(C ΔW, ΔW) with ΔW = W_B − W_A, C = V Vᵀ/‖V‖_F,
V = W_A − W_U, select layers, and repair only those; every other tensor keeps B's value. Layers
are selected on ρ rounded to 5 decimals, as both references round it.
"""

from __future__ import annotations

import math

import torch

from safealign.layers import layer_index
from safealign.merge.methods.base import (
    METHODS,
    LayerScore,
    MergeMethod,
    Param,
    boolean,
    density,
    number,
    one_of,
    positive_int,
    weight_pair,
)
from safealign.merge.methods.lowrank import LowRank, Update, cosine, norm, project
from safealign.merge.methods.sparsify import dare_drop, tensor_generator

#: Safe LoRA's threshold when ``select=threshold`` is given without ``tau`` (IBM's default).
THRESHOLD = 0.5
#: How SafeMERGE combines the fine-tuned and safety updates of a selected layer.
COMBINATIONS = ("peft-linear", "exact")


def is_layer_weight(name: str, ndim: int) -> bool:
    """A 2-D weight inside a decoder layer (the matrices the layer-wise methods score)."""
    return ndim == 2 and name.endswith(".weight") and layer_index(name) is not None


def update_of(value: Update, aligned: torch.Tensor) -> Update:
    """The update of a role's value over the aligned weight."""
    return value if isinstance(value, LowRank) else value - aligned


def apply(aligned: torch.Tensor, update: Update) -> torch.Tensor:
    return aligned + (update.dense() if isinstance(update, LowRank) else update)


def rounded_scores(scores: list[LayerScore]) -> list[tuple[float, str]]:
    """(ρ rounded to 5 decimals, name) of each scored layer; layers the fine-tuning left
    untouched (ρ NaN) are never selected."""
    return [(round(s.rho, 5), s.name) for s in scores if not math.isnan(s.rho)]


def peft_linear(parts: list[tuple[LowRank, float]]) -> LowRank:
    """PEFT's ``add_weighted_adapter(combination_type="linear")`` on one layer.

    Each LoRA's factors are weighted by √|w·s| (the sign of w·s on A only) and summed, A with A
    and B with B, into one LoRA of the same rank with scale 1: the update is
    (Σ √|wᵢsᵢ| Bᵢ)(Σ ±√|wⱼsⱼ| Aⱼ), cross terms Bᵢ Aⱼ included, not Σ wᵢ sᵢ Bᵢ Aᵢ. LoRAs that
    leave the layer alone (rank 0) take no part, as PEFT skips adapters absent from a layer.
    """
    parts = [(update, weight) for update, weight in parts if update.rank > 0]
    if not parts:
        raise ValueError("combination peft-linear: no LoRA updates this layer")
    ranks = sorted({update.rank for update, _ in parts})
    if len(ranks) > 1:
        raise ValueError(
            f"combination peft-linear needs LoRAs of one rank (PEFT's linear refuses others), "
            f"got ranks {ranks}: use combination=exact"
        )
    a = b = 0.0
    for update, weight in parts:
        scaled = weight * update.scale
        root = math.sqrt(abs(scaled))
        a = a + math.copysign(root, scaled) * update.A
        b = b + root * update.B
    return LowRank(a, b, 1.0)


class SafetyMethod(MergeMethod):
    """A merge whose inputs are roles around the aligned base model.

    The fine-tuned (and safety) models are read as LoRA factors when they are LoRAs on A; the
    output keeps the fine-tuned model's config and tokenizer.
    """

    requires_base = True
    required_roles = ("finetuned",)
    factor_roles = ("finetuned", "safety")
    cache_inputs = True
    source_role = "finetuned"


class LayerwiseSafetyMethod(SafetyMethod):
    """Score each layer weight, select some, repair the selected ones."""

    adapter_output = True
    required_roles = ("finetuned", "unaligned")

    def scores(self, name, ndim):
        return is_layer_weight(name, ndim)

    def score(self, name, tensors, base):
        update = update_of(tensors["finetuned"], base)
        v = base - tensors["unaligned"]
        projected = project(v, update)
        norm_update = norm(update)
        rho = cosine(projected, update) if norm_update > 0 else math.nan
        return LayerScore(
            name, rho, torch.linalg.matrix_norm(v).item(), norm_update, norm(projected)
        )

    def select(self, scores, params):
        """Names of the layers to repair: rounded ρ < τ (SafeMERGE's rule)."""
        tau = float(params.global_["tau"])
        return {name for rho, name in rounded_scores(scores) if rho < tau}

    def merge(self, name, tensors, base, params):
        finetuned = tensors["finetuned"]
        if not (params.selected and is_layer_weight(name, base.dim())):
            return apply(base, update_of(finetuned, base))
        return apply(base, self.repair(name, tensors, base, params))

    def merge_lowrank(self, name, tensors, base, params):
        finetuned = tensors["finetuned"]
        if not params.selected:
            return finetuned
        return self.repair(name, tensors, base, params)

    def repair(self, name, tensors, base, params) -> Update:
        """The update that replaces the fine-tuning update on a selected layer."""
        raise NotImplementedError


@METHODS.register("safemerge")
class SafeMerge(LayerwiseSafetyMethod):
    """SafeMERGE (Djuhera et al. 2025): layers with ρ < τ become w_ft·B + w_safe·S.

    Weights are [fine-tuned, safety] as in the paper's code (default [0.8, 0.2]), on updates
    over A (ΔW_S = 0 when the safety model is A). ``combination``: ``peft-linear`` (default)
    combines the LoRAs' factors as the reference does (PEFT's ``linear``, :func:`peft_linear`:
    cross terms included; LoRAs of one rank); ``exact`` merges the updates themselves,
    w_ft·ΔW_B + w_safe·ΔW_S (LoRA out: the two LoRAs side by side). A full-weight input has no
    factors, so both give the exact sum there.
    """

    summary = "merge layers that leave the alignment subspace with a safety model"
    optional_roles = ("safety",)
    parameters = (
        Param("tau", 0.35, check=number, help="layers with rho below are merged"),
        Param("weights", [0.8, 0.2], check=weight_pair, help="[fine-tuned, safety]", listlike=True),
        Param(
            "combination",
            "peft-linear",
            check=one_of(*COMBINATIONS),
            help="peft-linear: LoRA factors combined as the reference; exact: sum of updates",
        ),
    )

    def repair(self, name, tensors, base, params):
        w_ft, w_safe = (float(w) for w in params.global_["weights"])
        parts = [(update_of(tensors["finetuned"], base), w_ft)]
        if tensors.get("safety") is not None:
            parts.append((update_of(tensors["safety"], base), w_safe))
        low_rank = all(isinstance(update, LowRank) for update, _ in parts)
        if low_rank and params.global_["combination"] == "peft-linear":
            return peft_linear(parts)
        if low_rank:
            return LowRank.concat([update.scaled(weight) for update, weight in parts])
        return sum(
            weight * (update.dense() if isinstance(update, LowRank) else update)
            for update, weight in parts
        )


@METHODS.register("safe_lora")
class SafeLora(LayerwiseSafetyMethod):
    """Safe LoRA (Hsu et al. 2024): ΔW ← C ΔW on selected layers.

    Selection as IBM's code: the k lowest ρ (``lowest``, IBM's ``number`` mode, default k 10:
    every layer whose rounded ρ is ≤ the k-th lowest, so ties at the k-th are all kept), or a
    threshold (rounded ρ ≤ τ, default 0.5). Without ``select`` the rule is ``threshold`` when
    ``tau`` is given (``safe_lora:tau=0.35``), else ``lowest``. A LoRA stays a LoRA:
    B ← V (Vᵀ B)/‖V‖_F with A and the scale kept.
    """

    summary = "project the update of low-similarity layers onto the alignment subspace"
    parameters = (
        Param(
            "select",
            None,
            check=one_of("lowest", "threshold"),
            help="lowest (default), or threshold (default when tau is given)",
        ),
        Param("tau", None, check=number, help="threshold: rho <= tau is projected (0.5)"),
        Param("k", 10, check=positive_int, help="lowest: the k lowest rho (ties kept)"),
    )

    def select(self, scores, params):
        scored = rounded_scores(scores)
        if not scored:
            return set()
        tau = params.global_["tau"]
        rule = params.global_["select"] or ("lowest" if tau is None else "threshold")
        if rule == "threshold":
            bound = THRESHOLD if tau is None else float(tau)
        else:
            bound = sorted(rho for rho, _ in scored)[: int(params.global_["k"])][-1]
        return {name for rho, name in scored if rho <= bound}

    def repair(self, name, tensors, base, params):
        return project(base - tensors["unaligned"], update_of(tensors["finetuned"], base))


@METHODS.register("resta")
class Resta(SafetyMethod):
    """RESTA (Bhardwaj et al. 2024): W_B + β·(W_A − W_H) on every tensor.

    H is the harmful model: A fine-tuned on harmful data (the paper's "unaligned" model), so
    W_A − W_H is the safety vector that fine-tuning on harmful data removes; β defaults to 1.0
    as in the paper. ``density`` < 1 first applies DARE to the fine-tuning update W_B − W_A
    (``rescale`` keeps its L1 norm).
    """

    summary = "add the safety vector A - H (H: A fine-tuned on harmful data) to the fine-tune"
    required_roles = ("finetuned", "harmful_model")
    parameters = (
        Param("beta", 1.0, check=number, help="scale of the safety vector"),
        Param("density", 1.0, check=density, help="DARE on the fine-tuning update"),
        Param("rescale", True, check=boolean, help="DARE: keep the L1 norm"),
    )

    def merge(self, name, tensors, base, params):
        finetuned = tensors["finetuned"]
        update = update_of(finetuned, base)
        update = update.dense() if isinstance(update, LowRank) else update
        keep = float(params.global_["density"])
        if keep < 1:
            generator = tensor_generator(params.seed, name, "finetuned")
            update = dare_drop(update, keep, rescale=params.global_["rescale"], generator=generator)
        safety_vector = base - tensors["harmful_model"]
        return base + update + float(params.global_["beta"]) * safety_vector


@METHODS.register("interpolate")
class Interpolate(SafetyMethod):
    """W_B + α·(W_A − W_B) on every tensor: the plain baseline.

    α defaults to 0.2, the safety share of SafeMERGE's [0.8, 0.2] applied to every layer, so the
    two compare directly.
    """

    summary = "move every weight a share alpha back toward the aligned model"
    adapter_output = True
    parameters = (Param("alpha", 0.2, check=number, help="0: fine-tuned, 1: aligned"),)

    def merge(self, name, tensors, base, params):
        return apply(base, self.merge_lowrank(name, tensors, base, params))

    def merge_lowrank(self, name, tensors, base, params):
        update = update_of(tensors["finetuned"], base)
        return (
            update.scaled(1 - float(params.global_["alpha"]))
            if isinstance(update, LowRank)
            else (1 - float(params.global_["alpha"])) * update
        )
