"""CSULoRA (Marchenko Breneur et al. 2026, "CSULoRA: Closest Safe Update Low-Rank Adaptation",
arXiv 2605.30640): the closest safe update of a fine-tuning update, in closed form.

Per layer weight, the safety subspace comes from the alignment displacement V = W_A − W_U
(A aligned, U the model before alignment, as Safe LoRA's V): V = U_V Σ R_Vᵀ, and its top k
left and right singular vectors span the output side P = U_k U_kᵀ and the input side
Q = R_k R_kᵀ. The fine-tuning update ΔW (s·B·A for a LoRA, W_B − W_A for a full fine-tune)
splits into four Frobenius-orthogonal blocks, the paper's three components:

    fully aligned       P ΔW Q
    partially aligned   P ΔW Q⊥ + P⊥ ΔW Q          (P⊥ = I − P, Q⊥ = I − Q)
    off-subspace        P⊥ ΔW Q⊥

The correction is the closed-form minimiser of a penalised minimum-change problem on the update's
two factors (ΔW = B·A; any factorisation gives the same result, a dense ΔW is ΔW·I)::

    B* = argmin ‖B' − B‖²_F + λ ε_out ‖P⊥ B'‖²_F  = (P + β P⊥) B,   β = 1 / (1 + λ ε_out)
    A* = argmin ‖A' − A‖²_F + λ ε_in  ‖A' Q⊥‖²_F  = A (Q + α Q⊥),   α = 1 / (1 + λ ε_in)
    ΔW* = s B* A* = (P + β P⊥) ΔW (Q + α Q⊥)

with ε_out = ‖P⊥ ΔW‖²/‖ΔW‖² and ε_in = ‖ΔW Q⊥‖²/‖ΔW‖², the relative energy of the update outside
the subspace on each side. So the fully aligned block is kept exactly, the partially aligned
blocks are scaled by β and α, the off-subspace block by αβ: attenuated, never deleted, the more
the larger its energy. A LoRA stays a LoRA of the same rank, scale and targets (B* and A* are
the corrected factors; no d×d matrix is formed), and its correction equals the dense one.

What is ours: the paper's method section and the authors' code (Oleksandr-MB/NLPAICS2026_CSULoRA)
could not be read where this was written; the abstract fixes the subspace (from the aligned
minus base displacement), the three components, a closed-form penalised minimum-change solution
that keeps the fully aligned component and attenuates the rest by their relative energy. The
factorised objective above, the relative energies ε, λ = 1.0, the subspace rank (the fewest
singular vectors holding ``energy`` = 0.9 of ‖V‖²_F), correcting every layer weight the
fine-tune changes, and leaving unchanged a layer whose displacement V is zero (no subspace to
measure against) are our choices, to be checked against the paper. The per-layer report gives
Safe LoRA's ρ = cos(C ΔW, ΔW) and norms, for comparison with the other layer-wise methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from safealign.merge.methods.base import METHODS, LayerScore, Param, density, number
from safealign.merge.methods.lowrank import LowRank, Update, norm
from safealign.merge.methods.safety import LayerwiseSafetyMethod, update_of


def non_negative(value: Any) -> str | None:
    if number(value) is not None or value < 0:
        return f"must be a number >= 0, got {value!r}"
    return None


@dataclass(frozen=True)
class SafetySubspace:
    """Orthonormal bases of the output side (``left``: [out, k]) and the input side
    (``right``: [in, k]) of the safety subspace."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def safety_subspace(v: torch.Tensor, energy: float) -> SafetySubspace | None:
    """The top-k singular vectors of V, k the fewest holding ``energy`` of ‖V‖²_F; None when
    V is zero."""
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    power = s.square()
    total = power.sum()
    if total.item() == 0.0:
        return None
    share = power.cumsum(0) / total
    k = min(int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1, len(s))
    return SafetySubspace(u[:, :k], vh[:k].T)


def on_left(x: torch.Tensor, basis: torch.Tensor, factor: float) -> torch.Tensor:
    """(P + factor·P⊥) x with P = basis basisᵀ."""
    return factor * x + (1.0 - factor) * (basis @ (basis.T @ x))


def on_right(x: torch.Tensor, basis: torch.Tensor, factor: float) -> torch.Tensor:
    """x (Q + factor·Q⊥) with Q = basis basisᵀ."""
    return factor * x + (1.0 - factor) * ((x @ basis) @ basis.T)


def _left_part(update: Update, basis: torch.Tensor) -> Update:
    """Uᵀ ΔW: its norm is ‖P ΔW‖."""
    if isinstance(update, LowRank):
        return LowRank(update.A, basis.T @ update.B, update.scale)
    return basis.T @ update


def _right_part(update: Update, basis: torch.Tensor) -> Update:
    """ΔW R: its norm is ‖ΔW Q‖."""
    if isinstance(update, LowRank):
        return LowRank(update.A @ basis, update.B, update.scale)
    return update @ basis


@dataclass(frozen=True)
class Attenuation:
    """The relative energies of an update outside the subspace and the factors they give."""

    outside_out: float  # ε_out = ‖P⊥ ΔW‖² / ‖ΔW‖²
    outside_in: float  # ε_in = ‖ΔW Q⊥‖² / ‖ΔW‖²
    beta: float  # 1 / (1 + λ ε_out): P⊥ side
    alpha: float  # 1 / (1 + λ ε_in): Q⊥ side


def attenuation(update: Update, subspace: SafetySubspace, penalty: float) -> Attenuation:
    """ε_out, ε_in and the factors β, α of ``update`` (dense or LoRA: r×r Gram matrices only)."""
    total = norm(update) ** 2
    inside_out = norm(_left_part(update, subspace.left)) ** 2
    inside_in = norm(_right_part(update, subspace.right)) ** 2
    outside_out = min(max(1.0 - inside_out / total, 0.0), 1.0)
    outside_in = min(max(1.0 - inside_in / total, 0.0), 1.0)
    return Attenuation(
        outside_out,
        outside_in,
        1.0 / (1.0 + penalty * outside_out),
        1.0 / (1.0 + penalty * outside_in),
    )


def closest_safe_update(
    update: Update, v: torch.Tensor, *, penalty: float, energy: float
) -> Update:
    """ΔW* = (P + β P⊥) ΔW (Q + α Q⊥); a LoRA gives a LoRA of the same rank and scale.

    ``update`` unchanged when it is zero or V is zero.
    """
    subspace = safety_subspace(v, energy)
    if subspace is None or norm(update) == 0.0:
        return update
    factors = attenuation(update, subspace, penalty)
    if isinstance(update, LowRank):
        return LowRank(
            on_right(update.A, subspace.right, factors.alpha),
            on_left(update.B, subspace.left, factors.beta),
            update.scale,
        )
    shrunk = on_left(update, subspace.left, factors.beta)
    return on_right(shrunk, subspace.right, factors.alpha)


@METHODS.register("csulora")
class CsuLora(LayerwiseSafetyMethod):
    """CSULoRA: every layer weight the fine-tune changes gets its closest safe update.

    ΔW ← (P + β P⊥) ΔW (Q + α Q⊥), P and Q the output and input sides of the top singular
    subspace of V = W_A − W_U holding ``energy`` of ‖V‖²_F, β = 1/(1 + λ ε_out),
    α = 1/(1 + λ ε_in), ε the update's relative energy outside each side (module docstring).
    Every scored layer with a non-zero update and a non-zero V is corrected; a LoRA stays a
    LoRA of the same rank; a full fine-tune's update is W_B − W_A.
    """

    summary = "attenuate each update's components outside the alignment subspace (closed form)"
    parameters = (
        Param("penalty", 1.0, check=non_negative, help="lambda: 0 keeps the update"),
        Param("energy", 0.9, check=density, help="share of |A - U|^2 the subspace holds"),
    )

    def select(self, scores: list[LayerScore], params) -> set[str]:
        """Every layer the fine-tune changes whose displacement V is not zero."""
        return {s.name for s in scores if not math.isnan(s.rho) and s.norm_v > 0.0}

    def repair(self, name, tensors, base, params) -> Update:
        return closest_safe_update(
            update_of(tensors["finetuned"], base),
            base - tensors["unaligned"],
            penalty=float(params.global_["penalty"]),
            energy=float(params.global_["energy"]),
        )
