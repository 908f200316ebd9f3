"""Alignment-subspace algebra on dense and LoRA (low-rank, :class:`LowRank`) weight updates.

For a layer weight, V = W_aligned - W_unaligned and C = V Vᵀ / ‖V‖_F. The score of a fine-tuning
update ΔW is ρ = cos(vec(C ΔW), vec(ΔW)). For LoRA, ΔW = s·B·A (B: [out, r], A: [r, in]), so
C ΔW = V (Vᵀ B) A · s/‖V‖_F is again a LoRA with the same A, and every norm and inner product
goes through r×r Gram matrices: no d×d matrix is ever formed.
"""

from __future__ import annotations

import math

import torch

from safealign.checkpoint import LowRank

Update = torch.Tensor | LowRank


def inner(x: Update, y: Update) -> float:
    """Frobenius inner product ⟨x, y⟩ of two updates, dense or low-rank."""
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        # tr((s1 B1 A1)ᵀ s2 B2 A2) = s1 s2 Σ (B1ᵀ B2) ⊙ (A1 A2ᵀ): r1×r2 matrices only
        return float(x.scale * y.scale * ((x.B.T @ y.B) * (x.A @ y.A.T)).sum())
    if isinstance(x, LowRank):
        x, y = y, x
    if isinstance(y, LowRank):
        # ⟨X, s B A⟩ = s Σ (Bᵀ X) ⊙ A
        return float(y.scale * ((y.B.T @ x) * y.A).sum())
    return float((x * y).sum())


def norm(x: Update) -> float:
    return math.sqrt(max(inner(x, x), 0.0))


def cosine(x: Update, y: Update) -> float:
    """cos(vec x, vec y); 0 when either is zero (as torch's cosine_similarity gives)."""
    nx, ny = norm(x), norm(y)
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return inner(x, y) / (nx * ny)


def project(v: torch.Tensor, update: Update) -> Update:
    """C·update with C = V Vᵀ/‖V‖_F; a LoRA stays a LoRA with the same A."""
    v_norm = torch.linalg.matrix_norm(v).item()
    if v_norm == 0.0:
        return update.scaled(0.0) if isinstance(update, LowRank) else torch.zeros_like(update)
    if isinstance(update, LowRank):
        return LowRank(update.A, v @ (v.T @ update.B) / v_norm, update.scale)
    out_dim, in_dim = v.shape
    # the intermediate is min(out, in)² entries: never larger than the weight itself
    if in_dim < out_dim:
        return v @ (v.T @ update) / v_norm
    return (v @ v.T) @ update / v_norm
