"""Safety-aware merges of a fine-tuned model B with its aligned origin A.

Inputs are keyed by role: the base tensor is the aligned model A's; ``tensors`` holds
``finetuned`` (B) and, per method, ``unaligned`` (U, the model before alignment) and ``safety``
(S, a safety model: a LoRA on A, or A itself when absent). A role's value is a full weight
(``Tensor``) or a LoRA update on A (:class:`LowRank`).

Layer-wise methods score each layer weight (every 2-D weight inside a decoder layer: q, k, v, o,
gate, up, down projections) by ρ = cos(C ΔW, ΔW) with ΔW = W_B − W_A, C = V Vᵀ/‖V‖_F,
V = W_A − W_U, select layers, and repair only those; every other tensor keeps B's value.
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


def is_layer_weight(name: str, ndim: int) -> bool:
    """A 2-D weight inside a decoder layer (the matrices the layer-wise methods score)."""
    return ndim == 2 and name.endswith(".weight") and layer_index(name) is not None


def update_of(value: Update, aligned: torch.Tensor) -> Update:
    """The update of a role's value over the aligned weight."""
    return value if isinstance(value, LowRank) else value - aligned


def apply(aligned: torch.Tensor, update: Update) -> torch.Tensor:
    return aligned + (update.dense() if isinstance(update, LowRank) else update)


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
        """Names of the layers to repair; layers the fine-tuning left untouched never are."""
        tau = float(params.global_["tau"])
        return {s.name for s in scores if not math.isnan(s.rho) and s.rho < tau}

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

    Weights are [fine-tuned, safety] as in the paper's code (default [0.8, 0.2]); computed on
    updates over A: ΔW ← w_ft·ΔW_B + w_safe·ΔW_S, with ΔW_S = 0 when the safety model is A.
    The reference merges two LoRAs' A and B factors separately (PEFT's ``linear``); we merge
    the updates themselves, which is exact (LoRA out: the two LoRAs side by side).
    """

    summary = "merge layers that leave the alignment subspace with a safety model"
    optional_roles = ("safety",)
    parameters = (
        Param("tau", 0.35, check=number, help="layers with rho below are merged"),
        Param("weights", [0.8, 0.2], check=weight_pair, help="[fine-tuned, safety]", listlike=True),
    )

    def repair(self, name, tensors, base, params):
        w_ft, w_safe = (float(w) for w in params.global_["weights"])
        update = update_of(tensors["finetuned"], base)
        safety = tensors.get("safety")
        safety_update = None if safety is None else update_of(safety, base)
        if isinstance(update, LowRank) and (
            safety_update is None or isinstance(safety_update, LowRank)
        ):
            parts = [update.scaled(w_ft)]
            if safety_update is not None:
                parts.append(safety_update.scaled(w_safe))
            return LowRank.concat(parts)
        dense = update.dense() if isinstance(update, LowRank) else update
        out = w_ft * dense
        if safety_update is not None:
            safety_dense = (
                safety_update.dense() if isinstance(safety_update, LowRank) else safety_update
            )
            out = out + w_safe * safety_dense
        return out


@METHODS.register("safe_lora")
class SafeLora(LayerwiseSafetyMethod):
    """Safe LoRA (Hsu et al. 2024): ΔW ← C ΔW on selected layers.

    Selection by threshold (ρ < τ, default 0.5) or the k lowest ρ (default 10). A LoRA stays a
    LoRA: B ← V (Vᵀ B)/‖V‖_F with A and the scale kept.
    """

    summary = "project the update of low-similarity layers onto the alignment subspace"
    parameters = (
        Param("select", "threshold", check=one_of("threshold", "lowest"), help="selection rule"),
        Param("tau", 0.5, check=number, help="threshold: layers with rho below are projected"),
        Param("k", 10, check=positive_int, help="lowest: how many layers are projected"),
    )

    def select(self, scores, params):
        if params.global_["select"] == "threshold":
            return super().select(scores, params)
        scored = sorted((s for s in scores if not math.isnan(s.rho)), key=lambda s: s.rho)
        return {s.name for s in scored[: int(params.global_["k"])]}

    def repair(self, name, tensors, base, params):
        return project(base - tensors["unaligned"], update_of(tensors["finetuned"], base))


@METHODS.register("resta")
class Resta(SafetyMethod):
    """RESTA (Bhardwaj et al. 2024): W_B + β·(W_A − W_U) on every tensor.

    ``density`` < 1 first applies DARE to the fine-tuning update W_B − W_A (``rescale`` keeps its
    L1 norm). β defaults to 0.5.
    """

    summary = "add the safety vector A - U to the fine-tuned model"
    required_roles = ("finetuned", "unaligned")
    parameters = (
        Param("beta", 0.5, check=number, help="scale of the safety vector"),
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
        return base + update + float(params.global_["beta"]) * (base - tensors["unaligned"])


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
