"""adaptive-kl (A-Reg): per-example (1 - beta) NLL + beta KL, beta from a safety critic."""

from __future__ import annotations

import json

import torch

from safealign.retrain.critic import JudgeCritic, beta, ema, fit_probe, pooled_states
from safealign.retrain.data import run_prompts
from safealign.retrain.divergence import example_index
from safealign.retrain.regularizers.base import Regularizer, Run, nll_kl_rows


class AdaptiveKL(Regularizer):
    """beta = clamp(beta_min + (beta_max - beta_min) s, 0.1, 0.9), s the critic's score of the
    example (1 = unsafe), optionally smoothed across examples by an EMA; beta has no gradient."""

    reference = True
    options = {
        "beta_min": "beta_min",
        "beta_max": "beta_max",
        "ema": "critic_ema",
        "critic": "critic",
        "direction": "kl_direction",
        "chunk": "kl_chunk",
        "layers": "layers",
    }

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 0.9,
        ema: float = 0.0,
        critic: str = "probe",
        direction: str | None = "forward",
        chunk: int = 0,
        layers: tuple[int, ...] | None = (),
    ):
        if not (0 <= beta_min <= beta_max <= 1):
            raise ValueError(f"need 0 <= beta_min <= beta_max <= 1, got {beta_min}, {beta_max}")
        if critic != "probe" and not critic.startswith("judge:"):
            raise ValueError(f"critic must be probe or judge:NAME, got {critic!r}")
        self.beta_min, self.beta_max, self.ema = float(beta_min), float(beta_max), float(ema)
        self.critic, self.direction, self.chunk = critic, direction or "forward", int(chunk)
        self.layers = tuple(layers or ())
        self.last: float | None = None
        self.table: torch.Tensor | None = None
        self.judge: JudgeCritic | None = None

    def setup(self, run: Run) -> None:
        if self.critic.startswith("judge:"):
            self.judge = JudgeCritic(self.critic.removeprefix("judge:"))
            return
        settings = run.settings
        harmful = run_prompts(settings.harmful, "harmful")
        benign = run_prompts(settings.benign, "benign")
        probe, info = fit_probe(
            run.reference.forward,
            run.tokenizer,
            harmful,
            benign,
            layers=self.layers,
            device=run.device,
            seed=settings.seed,
        )
        prompt_ids = [ids[:start] or ids for ids, start in run.examples]
        x = pooled_states(
            run.reference.forward, prompt_ids, self.layers, run.tokenizer.pad_token_id, run.device
        )
        self.table = probe.predict(x).float()
        info["train_mean_score"] = float(self.table.mean())
        run.files["critic.json"] = json.dumps(info | {"probe": probe.to_dict()}, indent=1)
        run.metrics["probe_auroc"] = info["heldout_auroc"]
        run.log(f"probe critic: held-out AUROC {info['heldout_auroc']:.3f}")

    def scores(self, run: Run, inputs: dict) -> torch.Tensor:
        """The critic's s for each example of the batch (``inputs['index']``)."""
        index = inputs["index"].tolist()
        if self.judge is not None:
            prompts = [run.prompts[i] for i in index]
            return self.judge.scores(run.unwrapped, run.tokenizer, prompts)
        return self.table[index]

    def loss(self, run: Run, inputs: dict, out, ref):
        s = self.scores(run, inputs)
        if self.ema > 0:
            s, self.last = ema(s, self.last, self.ema)
        b = beta(s, self.beta_min, self.beta_max).to(out.logits.device)
        weight = b[example_index(inputs["labels"])]
        nll, kl = nll_kl_rows(out, ref, inputs, self.direction, self.chunk)
        total = ((1 - weight) * nll + weight * kl).sum()
        stats = {"nll": nll.mean().item(), "kl": kl.mean().item(), "beta": b.mean().item()}
        return total, stats

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]
