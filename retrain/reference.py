"""The reference model, without a second copy where the method allows.

- a fresh LoRA: the same model with its adapter disabled (``disable_adapter()``);
- LoRA continued from an existing adapter, ``--full``, and ``epoch-kl``'s previous epoch: a
  frozen snapshot of the *trainable* tensors only (the adapter: a few MB; a full model: one
  copy in the training dtype, taken in memory once, not re-read from disk), run through
  ``torch.func.functional_call`` so the shared frozen weights are used as they are.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (no dropout) and restore its mode after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _positive_rate(config: dict) -> bool:
    for key, value in config.items():
        if isinstance(value, dict) and _positive_rate(value):
            return True
        if "dropout" in str(key) and isinstance(value, int | float) and value > 0:
            return True
    return False


def has_dropout(model: nn.Module) -> bool:
    """Whether eval mode changes ``model``'s outputs: a dropout module with p > 0, or a
    dropout rate above 0 in its config (attention dropout is applied functionally)."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return config is not None and _positive_rate(config.to_dict())


class Reference:
    """Forward passes of the reference under ``no_grad``; ``model`` is the unwrapped model.
    It runs in eval mode only if the model has dropout (switching modes walks every module)."""

    def __init__(self, model: nn.Module, snapshot: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.snapshot = snapshot
        self.dropout = has_dropout(model)

    @classmethod
    def adapter_off(cls, model: nn.Module) -> Reference:
        """The base under the adapter: exact for a fresh LoRA (B = 0)."""
        if not hasattr(model, "disable_adapter"):
            raise TypeError("adapter_off needs a PEFT model")
        return cls(model, None)

    @classmethod
    def frozen(cls, model: nn.Module) -> Reference:
        """A frozen copy of the trainable tensors as they are now."""
        reference = cls(model, {})
        reference.refresh()
        return reference

    def refresh(self) -> None:
        """Take the snapshot again from the current weights (epoch-kl at an epoch's end)."""
        self.snapshot = {n: p.detach().clone() for n, p in trainable(self.model).items()}

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot (0 when the adapter is switched off instead)."""
        return sum(t.numel() * t.element_size() for t in (self.snapshot or {}).values())

    @torch.no_grad()
    def forward(
        self, inputs: dict[str, torch.Tensor], hidden: bool = False, logits_to_keep: int = 0
    ):
        """The reference's outputs on ``inputs`` (``input_ids``, ``attention_mask``); logits
        of the last ``logits_to_keep`` positions only (0: all)."""
        kwargs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "output_hidden_states": hidden,
        }
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        with eval_mode(self.model) if self.dropout else nullcontext():
            if self.snapshot is None:
                with self.model.disable_adapter():
                    return self.model(**kwargs)
            return torch.func.functional_call(self.model, self.snapshot, args=(), kwargs=kwargs)

    def state_dict(self) -> dict:
        return {"snapshot": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        if state.get("snapshot") is not None:
            self.snapshot = state["snapshot"]
