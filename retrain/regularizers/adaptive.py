"""adaptive-kl (A-Reg): per-example (1 - beta) NLL + beta KL, beta from a safety critic."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from safealign.progress import say
from safealign.retrain.critic import (
    POOLS,
    JudgeCritic,
    auroc,
    beta,
    ema,
    fit_probe,
    pooled_states,
)
from safealign.retrain.data import harmful_labels, held_apart
from safealign.retrain.divergence import example_index
from safealign.retrain.regularizers.base import (
    Regularizer,
    RegularizerSettings,
    Run,
    nll_kl_rows,
)
from safealign.retrain.regularizers.divergence import chunk_setting, direction_setting
from safealign.settings import SettingsError, setting


@dataclass
class AdaptiveKLSettings(RegularizerSettings):
    """adaptive-kl's options."""

    regularizer = "adaptive-kl"

    #: A-Reg's range: beta in [0.1, 0.9] (the paper's clamp); on the lab: 0% harmful, task kept.
    beta_min: float = setting(
        0.1, help="beta at critic score 0.", min=0, max=1, old_name="beta_min"
    )
    beta_max: float = setting(
        0.9, help="beta at critic score 1.", min=0, max=1, old_name="beta_max"
    )
    ema: float = setting(
        0.0, help="EMA factor of critic scores.", min=0, max=1, old_name="critic_ema"
    )
    critic: str = setting("probe", help="probe or judge:NAME.", old_name="critic")
    direction: str = direction_setting("forward", "p_ref")
    chunk: int = chunk_setting()
    layers: tuple[int, ...] = setting(
        (),
        help="Hidden-state indices the probe pools.",
        min=0,
        default_text="all",
        old_name="layers",
    )
    #: last: A-Reg's paper; mean: its public code (and ours before).
    pool: str = setting(
        "last", help="How the probe pools a prompt's tokens: last or mean.", choices=POOLS
    )

    def check(self) -> None:
        super().check()
        if self.beta_min > self.beta_max:
            raise SettingsError(
                f"adaptive-kl:beta_min {self.beta_min} is above adaptive-kl:beta_max "
                f"{self.beta_max}"
            )
        if self.critic != "probe" and not self.critic.startswith("judge:"):
            raise SettingsError(
                f"adaptive-kl:critic must be probe or judge:NAME, got {self.critic!r}"
            )


class AdaptiveKL(Regularizer):
    """beta = clamp(beta_min + (beta_max - beta_min) s, 0.1, 0.9), s the critic's score of the
    example (1 = unsafe), optionally smoothed across examples by an EMA; beta has no gradient."""

    settings_class = AdaptiveKLSettings
    settings: AdaptiveKLSettings
    reference = True

    def __init__(self, settings: AdaptiveKLSettings | None = None):
        super().__init__(settings)
        self.last: float | None = None
        self.table: torch.Tensor | None = None
        self.judge: JudgeCritic | None = None
        self.reference_harm: torch.Tensor | None = None

    def setup(self, run: Run) -> None:
        critic = self.settings.critic
        if critic.startswith("judge:"):
            self.judge = JudgeCritic(critic.removeprefix("judge:"))
            # before the first step the model equals its reference: its replies are the reference's
            self.reference_harm = self.judge.reference_harm(
                run.unwrapped, run.tokenizer, run.prompts
            )
            run.metrics["reference_harm"] = float(self.reference_harm.mean())
            return
        taken = set(run.prompts)
        harmful, dropped_harmful = held_apart(run.inputs.harmful, "harmful", taken, self.name)
        benign, dropped_benign = held_apart(run.inputs.benign, "benign", taken, self.name)
        pool, layers = self.settings.pool, self.settings.layers
        forward = run.reference.forward
        probe, info = fit_probe(
            forward,
            run.tokenizer,
            harmful,
            benign,
            layers=layers,
            device=run.device,
            seed=run.settings.seed,
            pool=pool,
        )
        info |= {"dropped_harmful": dropped_harmful, "dropped_benign": dropped_benign}
        prompt_ids = [ids[:start] or ids for ids, start in run.examples]
        pad = run.tokenizer.pad_token_id
        x = pooled_states(forward, prompt_ids, layers, pad, run.device, pool=pool)
        self.table = probe.predict(x).float()
        info |= {"train_mean_score": float(self.table.mean())} | finetune_auroc(
            self.table, harmful_labels(run.kinds)
        )
        run.files["critic.json"] = json.dumps(info | {"probe": probe.to_dict()}, indent=1)
        run.metrics |= {
            "probe_auroc": info["heldout_auroc"],
            "probe_finetune_auroc": info["finetune_auroc"],
            "probe_task_score": info.get("finetune_mean_score_task"),
            "probe_dropped_harmful": dropped_harmful,
            "probe_dropped_benign": dropped_benign,
        }
        finetune = info["finetune_auroc"]
        say(
            run.progress,
            f"probe critic ({pool} token pooling): dropped {dropped_harmful} harmful and "
            f"{dropped_benign} benign prompts that are fine-tune prompts; held-out AUROC "
            f"{info['heldout_auroc']:.3f}, on the fine-tune's harmful vs task examples "
            + (f"{finetune:.3f}" if finetune is not None else f"none ({info['finetune_note']})"),
        )

    def scores(self, run: Run, inputs: dict) -> torch.Tensor:
        """The critic's s for each example of the batch (``inputs['index']``)."""
        index = inputs["index"].tolist()
        if self.judge is not None:
            prompts = [run.prompts[i] for i in index]
            reference = self.reference_harm[index]
            return self.judge.scores(run.unwrapped, run.tokenizer, prompts, reference)
        return self.table[index]

    def loss(self, run: Run, inputs: dict, out, ref):
        options = self.settings
        s = self.scores(run, inputs)
        if options.ema > 0:
            s, self.last = ema(s, self.last, options.ema)
        b = beta(s, options.beta_min, options.beta_max).to(out.logits.device)
        weight = b[example_index(inputs["labels"])]
        nll, kl = nll_kl_rows(out, ref, inputs, options.direction, options.chunk)
        total = ((1 - weight) * nll + weight * kl).sum()
        stats = {"nll": nll.mean().item(), "kl": kl.mean().item(), "beta": b.mean().item()}
        return total, stats

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state["last"]


def finetune_auroc(scores: torch.Tensor, labels: list[int | None]) -> dict:
    """The probe's AUROC on the fine-tune's examples, harmful (1) vs task (0), over those the
    data labels (:func:`~safealign.retrain.data.harmful_labels`), and its mean s on each kind
    (a task example's s sets its beta: high, and the KL holds the task back); None, with a
    note, when the labelled examples hold one class or none."""
    labelled = [
        (float(s), y) for s, y in zip(scores.tolist(), labels, strict=True) if y is not None
    ]
    harmful = sum(y for _, y in labelled)
    info = {
        "finetune_auroc": None,
        "n_finetune_harmful": harmful,
        "n_finetune_task": len(labelled) - harmful,
    }
    if not labelled:
        return info | {"finetune_note": "the data's rows carry no 'kind' field"}
    if harmful in (0, len(labelled)):
        return info | {"finetune_note": "the data's kinds hold one class only"}
    means = {
        f"finetune_mean_score_{kind}": sum(s for s, y in labelled if y == label)
        / sum(1 for _, y in labelled if y == label)
        for kind, label in (("harmful", 1), ("task", 0))
    }
    return info | {"finetune_auroc": auroc(*zip(*labelled, strict=True))} | means
