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

from safealign.chat import IGNORE


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


#: float32 elements of one ``[chunk, V]`` block (64 MB): the chunk when ``chunk`` is 0.
CHUNK_ELEMENTS = 2**24


def _kl_from_log(logp: torch.Tensor, logq: torch.Tensor, reverse: bool) -> torch.Tensor:
    if reverse:  # KL(p_model || p_ref)
        return (logp.exp() * (logp - logq)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)  # KL(p_ref || p_model)


def _nll_kl_rows(model_rows, ref_rows, targets, reverse: bool) -> torch.Tensor:
    """``[N, 2]``: NLL and KL of each row from one log-softmax of the model's logits."""
    logp = F.log_softmax(model_rows.float(), dim=-1)
    kl = _kl_from_log(logp, F.log_softmax(ref_rows.float(), dim=-1), reverse)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    return torch.stack([nll, kl], dim=-1)


def _chunked(fn, model_rows: torch.Tensor, *others, chunk: int | None, reverse: bool):
    """``fn`` over blocks of ``chunk`` rows, each under activation checkpointing."""
    if chunk == 0:
        chunk = max(1, CHUNK_ELEMENTS // model_rows.shape[-1])
    if chunk is None or model_rows.shape[0] <= chunk:
        return fn(model_rows, *others, reverse)
    parts = []
    for start in range(0, model_rows.shape[0], chunk):
        pieces = [t[start : start + chunk] for t in (model_rows, *others)]
        if torch.is_grad_enabled() and model_rows.requires_grad:
            parts.append(checkpoint(fn, *pieces, reverse, use_reentrant=False))
        else:
            parts.append(fn(*pieces, reverse))
    return torch.cat(parts)


def _reverse(direction: str) -> bool:
    if direction not in ("forward", "reverse"):
        raise ValueError(f"KL direction must be forward or reverse, got {direction!r}")
    return direction == "reverse"


def token_nll_kl(
    model_rows: torch.Tensor,
    ref_rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    direction: str = "forward",
    chunk: int | None = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL and KL per row (``[N]`` each), sharing the model's log-softmax, in chunks."""
    reverse = _reverse(direction)
    both = _chunked(
        _nll_kl_rows, model_rows, ref_rows.detach(), targets, chunk=chunk, reverse=reverse
    )
    return both[:, 0], both[:, 1]


def reply_positions(labels: torch.Tensor) -> torch.Tensor:
    """For each gathered row (order of :func:`shift`), the 1-based position of its token in
    its run of trained tokens: 1 for a reply's first token (each assistant turn restarts)."""
    keep = trained_mask(labels)
    count = keep.long().cumsum(1)
    before = torch.where(keep, 0, count).cummax(1).values
    return (count - before)[keep]


def token_wise_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, betas: torch.Tensor
) -> torch.Tensor:
    """Qi et al. (2025)'s token-wise constrained objective per row (``[N]``):
    ``2/beta_t * softplus(-beta_t * (log p(y_t) - log p_ref(y_t)))`` (= -2/beta_t log sigmoid).

    Its gradient is the NLL's times ``2 * (1 - sigmoid(beta_t * ratio))``: plain SFT where the
    model has not yet moved (ratio 0: weight 1), fading once it puts more weight on the
    trained token than the reference did, the faster the larger ``beta_t``."""
    return 2 / betas * F.softplus(-betas * (logp - ref_logp.detach()))


def position_betas(positions: torch.Tensor, betas: tuple[float, ...]) -> torch.Tensor:
    """``betas[t-1]`` for position t, the last value for every later position."""
    table = torch.tensor(betas, dtype=torch.float32, device=positions.device)
    return table[(positions - 1).clamp(max=len(betas) - 1)]


def example_index(labels: torch.Tensor) -> torch.Tensor:
    """For each gathered row (order of :func:`shift`), the index of its example in the batch."""
    keep = trained_mask(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)
    return rows[keep]
