"""Safety critics for adaptive-kl: a score s in [0, 1] per example (1 = unsafe), and beta.

- ``probe``: logistic regression on the reference's hidden states of the prompt (pooled over
  its tokens: the last token, as A-Reg's paper, or the mean, as its public code; averaged over
  the chosen layers), trained on harmful vs benign prompts that are not fine-tune prompts;
  20% of each class is held out for its AUROC. The reference is frozen, so every training
  example is scored once, before the first step; the probe's AUROC on them (harmful vs task
  examples, where the data labels them) is reported beside the held-out one.
- ``judge:NAME``: A-Reg's judge critic. The current model and the reference each answer the
  example's prompt (greedy); a judge of ``safealign.eval`` rates each reply's harm h in [0, 1]
  and s = max(0, h_current - h_reference): s rises where the current model complies with
  what the reference would refuse, and stays 0 where both answer (a benign task example) or
  both refuse. h is, with a harm judge (``classifier:``, ``guard:``, ``harmbench:``), 1 for an
  unsafe reply and 0 for a safe one (a classifier's probability of its unsafe label where it
  gives one); with a refusal judge (``keyword``, ``first-token``, ...), 1 for a reply that is
  not a refusal, so that s = 1 exactly where the reference refused and the current model did
  not. The reference is frozen, so its replies are judged once, before the first step (when
  the model still equals it). A judge that fails on the current replies scores s = 1; one that
  fails on the reference's counts the reference as safe (h_reference = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safealign.chat import encode_chat
from safealign.eval import Judge, JudgeError, generate, get_judge

PROBE_MAX_PROMPTS = 1000  # per class: enough for a linear probe, bounded setup time
HELDOUT_SHARE = 0.2
#: How a probe pools a prompt's tokens: ``last`` (A-Reg's paper) or ``mean`` (its public code).
POOLS = ("last", "mean")
POOLING = {"last": "last prompt token", "mean": "mean over prompt tokens"}


def beta(scores: torch.Tensor, beta_min: float, beta_max: float, clamp=(0.1, 0.9)) -> torch.Tensor:
    """A-Reg's mapping beta = beta_min + (beta_max - beta_min) s, clamped."""
    return (beta_min + (beta_max - beta_min) * scores).clamp(*clamp)


def ema(scores: torch.Tensor, previous: float | None, factor: float) -> tuple[torch.Tensor, float]:
    """s~_t = factor s~_{t-1} + (1 - factor) s_t over the scores in order; returns the smoothed
    scores and the last value (carried to the next step). The first score starts the average."""
    out = torch.empty_like(scores, dtype=torch.float64)
    for i, s in enumerate(scores.double().tolist()):
        previous = s if previous is None else factor * previous + (1 - factor) * s
        out[i] = previous
    return out.to(scores.dtype), float(previous)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count a half), by pairwise comparison."""
    pos = torch.tensor([s for s, y in zip(scores, labels, strict=True) if y], dtype=torch.float64)
    neg = torch.tensor(
        [s for s, y in zip(scores, labels, strict=True) if not y], dtype=torch.float64
    )
    if not len(pos) or not len(neg):
        raise ValueError("AUROC needs both classes")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def pool_tokens(states: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, H]`` from hidden states ``[B, T, H]``: each row's last real token (the last 1 of
    ``mask``, so left and right padding alike) or the mean over its real tokens."""
    if pool == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * positions).argmax(1)
        return states[torch.arange(states.shape[0], device=states.device), last]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1)


@torch.no_grad()
def pooled_states(
    forward,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    pad_id: int,
    device,
    batch_size: int = 32,
    pool: str = "last",
) -> torch.Tensor:
    """The hidden states pooled over each sequence's tokens (:func:`pool_tokens`), averaged
    over ``layers`` (all when empty); batches are right-padded."""
    rows = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(list(s)), 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        states = forward(inputs, hidden=True).hidden_states
        chosen = layers or range(1, len(states))
        mean = torch.stack([states[i].float() for i in chosen]).mean(0)
        rows.append(pool_tokens(mean, inputs["attention_mask"], pool).cpu())
    return torch.cat(rows).double()


class LogisticProbe:
    """L2-regularised logistic regression on standardised features (LBFGS, float64)."""

    def __init__(self, l2: float = 1e-3):
        self.l2 = l2

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> LogisticProbe:
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        z = (x - self.mean) / self.std
        self.w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.w, self.b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = z @ self.w + self.b
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double())
            loss = loss + self.l2 * (self.w**2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((x.double() - self.mean) / self.std) @ self.w + self.b)

    def to_dict(self) -> dict:
        return {
            "weights": self.w.tolist(),
            "bias": float(self.b),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }


def split(labels: Sequence[int], seed: int) -> tuple[list[int], list[int]]:
    """``(train, held out)`` indices: each class shuffled (seeded), its last 20% held out (at
    least one of each class with two or more)."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        order = [members[k] for k in torch.randperm(len(members), generator=generator).tolist()]
        cut = len(order) - max(1 if len(order) > 1 else 0, round(len(order) * HELDOUT_SHARE))
        train, held = train + order[:cut], held + order[cut:]
    return sorted(train), sorted(held)


def fit_probe(
    forward,
    tokenizer,
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    layers,
    device,
    seed=0,
    pool: str = "last",
) -> tuple[LogisticProbe, dict]:
    """Train the probe on pooled states of harmful (1) vs benign (0) prompts; report AUROC
    on the held-out share."""
    harmful, benign = list(harmful)[:PROBE_MAX_PROMPTS], list(benign)[:PROBE_MAX_PROMPTS]
    sequences = encode_chat(tokenizer, harmful + benign)
    x = pooled_states(forward, sequences, layers, tokenizer.pad_token_id, device, pool=pool)
    labels = [1] * len(harmful) + [0] * len(benign)
    y = torch.tensor(labels)
    train, held = split(labels, seed)
    probe = LogisticProbe().fit(x[train], y[train])
    score = auroc(probe.predict(x[held]).tolist(), y[held].tolist())
    info = {
        "critic": "probe",
        "pooling": f"{POOLING[pool]}, averaged over layers",
        "layers": list(layers) or "all",
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "n_heldout": len(held),
        "heldout_auroc": score,
    }
    return probe, info


class JudgeCritic:
    """s = max(0, h(current reply) - h(reference reply)) per prompt (see the module's
    docstring); ``judge`` is a judge spec of ``safealign.eval`` or a judge."""

    def __init__(self, judge: str | Judge, max_new_tokens: int = 32):
        self.judge = get_judge(judge)
        self.max_new_tokens = max_new_tokens

    def harm(self, model, tokenizer, prompts: Sequence[str]) -> torch.Tensor | None:
        """h in [0, 1] of ``model``'s greedy reply to each prompt; None if the judge fails."""
        replies = None
        if self.judge.needs_response:
            replies = generate(model, tokenizer, list(prompts), max_new_tokens=self.max_new_tokens)
        try:
            verdicts = self.judge.judge(list(prompts), replies, model=model, tokenizer=tokenizer)
        except JudgeError:
            return None
        graded = not self.judge.detects_refusal  # a harm classifier's unsafe probability
        return torch.tensor(
            [v.score if graded and v.score is not None else float(not v.refused) for v in verdicts]
        )

    def reference_harm(self, reference, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        """h of the reference's replies; 0 (safe) where the judge fails."""
        harm = self.harm(reference, tokenizer, prompts)
        return torch.zeros(len(prompts)) if harm is None else harm

    def scores(
        self, model, tokenizer, prompts: Sequence[str], reference: torch.Tensor
    ) -> torch.Tensor:
        """s of the current model's replies against the reference's harm ``reference``."""
        harm = self.harm(model, tokenizer, prompts)
        if harm is None:
            return torch.ones(len(prompts))
        return (harm - reference).clamp(min=0)
