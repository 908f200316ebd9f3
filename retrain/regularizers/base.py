"""What every regularizer shares: the run it sees, what it declares it needs, its settings,
its loss."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from safealign.progress import ProgressCallback
from safealign.retrain.divergence import shift, token_nll, token_nll_kl
from safealign.retrain.reference import Reference
from safealign.retrain.settings import RetrainInputs, RetrainSettings
from safealign.settings import Settings, SettingsError


@dataclass
class Run:
    """What a regularizer may use: the model being trained (``model``: as prepared by
    accelerate; ``unwrapped``: the plain module), the reference, the run's inputs, data (its
    examples, their ``prompts`` and data rows' ``kinds``) and settings, its ``progress``
    callback (None: silent). ``files`` collects what is written beside the output
    (critic.json, replay.jsonl)."""

    model: nn.Module
    unwrapped: nn.Module
    tokenizer: Any
    inputs: RetrainInputs
    settings: RetrainSettings
    examples: list
    device: torch.device
    reference: Reference | None = None
    prompts: list[str] = field(default_factory=list)
    kinds: list[str | None] = field(default_factory=list)
    progress: ProgressCallback = None
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RegularizerSettings(Settings):
    """A regularizer's own options, its defaults written once: ``NAME:key=value,...`` in a
    spec, NAME being ``regularizer``; messages name a field ``NAME:key``."""

    regularizer: ClassVar[str] = ""

    @classmethod
    def spelled(cls, field: dataclasses.Field) -> str:
        return f"{cls.regularizer}:{field.name}"

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        try:
            return super().coerce(name, value)
        except SettingsError as error:
            raise SettingsError(f"{cls.regularizer}:{error}") from None


class Regularizer:
    """A training objective. The loop calls :meth:`loss` per micro-batch; it returns the *sum*
    over the batch's trained tokens (the loop divides by the global token count) and stats.

    Class attributes declare needs: ``reference`` (a reference model; the loop runs it on each
    batch unless ``batch_reference`` is False), ``hidden`` (hidden states of model and
    reference), ``snapshot`` (a frozen copy even for a fresh LoRA). ``settings_class`` holds
    its options (as PEFT's ``LoraConfig`` belongs to LoRA); an instance reads them from
    ``self.settings``."""

    name: ClassVar[str] = ""
    settings_class: ClassVar[type[RegularizerSettings]]
    reference: ClassVar[bool] = False
    batch_reference: ClassVar[bool] = True
    hidden: ClassVar[bool] = False
    snapshot: ClassVar[bool] = False

    def __init__(self, settings: RegularizerSettings | None = None):
        self.settings = settings if settings is not None else self.settings_class()

    def check_inputs(self, inputs: RetrainInputs) -> None:
        """Refuse, before any model is loaded, inputs it cannot run with (SettingsError)."""

    def setup(self, run: Run) -> None:
        """Prepare before the first step (critic, replay data); may add to ``run.files``."""

    def loss(self, run: Run, inputs: dict, out, ref) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def on_epoch_start(self, run: Run, epoch: int) -> None:
        """Called before the first step of each epoch (also when resuming mid-run)."""

    def after_step(self, run: Run) -> None:
        """Called after each optimiser step."""

    def finish(self, run: Run) -> None:
        """Called once before the output is written."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (resume)."""


def nll_rows(out, inputs: dict) -> torch.Tensor:
    """Per-token NLL of the trained tokens (``[N]``)."""
    rows, targets = shift(out.logits, inputs["labels"])
    return token_nll(rows, targets)


def nll_kl_rows(out, ref, inputs: dict, direction: str, chunk: int):
    """Per-token NLL and KL (model vs reference) on the trained tokens (``[N]`` each)."""
    rows, targets = shift(out.logits, inputs["labels"])
    ref_rows, _ = shift(ref.logits, inputs["labels"])
    return token_nll_kl(rows, ref_rows, targets, direction=direction, chunk=chunk)


def per_step(value: torch.Tensor, inputs: dict) -> torch.Tensor:
    """A per-step term (weight distance, replay loss) weighted by this micro-batch's trained
    tokens, so that after the loop's division by the global count it adds ``value`` once."""
    return value * (inputs["labels"][:, 1:] != -100).sum()
