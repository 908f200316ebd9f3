"""Per-token losses over the vocabulary, computed in chunks of tokens.

Only the trained positions are gathered (``[N, V]`` rows of the logits), and the float32
log-softmax pairs that a KL needs are built for ``chunk`` rows at a time under activation
checkpointing: the backward pass recomputes a chunk instead of keeping ``[N, V]`` float32
intermediates. Chunked and dense give the same values and gradients (tests check both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from safealign.retrain.data import IGNORE


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, targets)``: logits at positions that predict a trained token, and the tokens."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return logits[:, :-1][keep], targets[keep]


def trained_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` True where the next token is trained."""
    return labels[:, 1:] != IGNORE


def token_nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each gathered row, in float32 (``[N]``)."""
    return F.cross_entropy(rows.float(), targets, reduction="none")


def _kl_rows(model_rows: torch.Tensor, ref_rows: torch.Tensor, reverse: bool) -> torch.Tensor:
    logp = F.log_softmax(model_rows.float(), dim=-1)
    logq = F.log_softmax(ref_rows.float(), dim=-1)
    if reverse:  # KL(p_model || p_ref)
        return (logp.exp() * (logp - logq)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)  # KL(p_ref || p_model)


def token_kl(
    model_rows: torch.Tensor,
    ref_rows: torch.Tensor,
    *,
    direction: str = "forward",
    chunk: int | None = 256,
) -> torch.Tensor:
    """KL per row (``[N]``): ``forward`` = KL(p_ref || p_model), ``reverse`` = KL(p_model || p_ref).

    ``chunk=None`` computes all rows at once (the dense reference the tests compare to).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"KL direction must be forward or reverse, got {direction!r}")
    reverse = direction == "reverse"
    ref_rows = ref_rows.detach()
    if chunk is None or model_rows.shape[0] <= chunk:
        return _kl_rows(model_rows, ref_rows, reverse)
    parts = []
    for start in range(0, model_rows.shape[0], chunk):
        m, r = model_rows[start : start + chunk], ref_rows[start : start + chunk]
        if torch.is_grad_enabled() and m.requires_grad:
            parts.append(checkpoint(_kl_rows, m, r, reverse, use_reentrant=False))
        else:
            parts.append(_kl_rows(m, r, reverse))
    return torch.cat(parts)


def example_index(labels: torch.Tensor) -> torch.Tensor:
    """For each gathered row (order of :func:`shift`), the index of its example in the batch."""
    keep = trained_mask(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)
    return rows[keep]
