"""The recovery plan: what a run would touch and roughly how much memory it needs.

Built from the checkpoints' headers alone (names, shapes, dtypes), without reading a weight:
this is what ``--dry-run`` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from safealign.checkpoint import Checkpoint
from safealign.recover.select import CHUNK
from safealign.recover.settings import RecoverSettings
from safealign.recover.weights import Layout
from safealign.resources import Estimate

GIB = 2**30
RUNTIME_BYTES = 600 * 2**20  # Python, torch and transformers themselves, measured on CPU


def working_dtype(settings: RecoverSettings) -> torch.dtype:
    """The torch dtype of resolved ``settings`` (``dtype`` is a torch dtype's name)."""
    return getattr(torch, settings.dtype)


@dataclass
class Plan:
    """Sizes of one recovery run with its resolved settings (layer, warmup, dtype, device)."""

    aligned: str
    finetuned: str
    finetuned_is_adapter: bool
    n_layers: int
    restorable_tensors: int
    restorable_params: int
    decoder_params: int
    per_step: int
    rollback: bool
    memory: dict[str, int]
    settings: RecoverSettings

    @classmethod
    def build(
        cls,
        aligned: Checkpoint,
        finetuned: Checkpoint,
        layout: Layout,
        settings: RecoverSettings,
        rollback: bool,
    ) -> Plan:
        per_step = layout.per_step(settings.rate)
        memory = memory_estimate(
            finetuned, layout, working_dtype(settings), per_step, settings.steps
        )
        return cls(
            aligned=aligned.name,
            finetuned=finetuned.name,
            finetuned_is_adapter=finetuned.is_adapter,
            n_layers=layout.n_layers,
            restorable_tensors=len(layout.targets),
            restorable_params=layout.target_params,
            decoder_params=layout.decoder_params,
            per_step=per_step,
            rollback=rollback,
            memory=memory,
            settings=settings,
        )

    def to_dict(self) -> dict:
        """The sizes (report.json records the settings on their own)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}

    @property
    def needs(self) -> Estimate:
        """Peak memory, and the disk the output takes (the model in the working dtype)."""
        return Estimate(self.memory["total"], self.memory["model"])

    def describe(self) -> str:
        """Human-readable plan, one fact per line."""
        s = self.settings
        mem = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in self.memory.items() if k != "total")
        most = min(self.per_step * s.steps, self.restorable_params)
        rollback = "on (task data given)" if self.rollback else "off (no task data)"
        kind = "LoRA adapter on aligned" if self.finetuned_is_adapter else "full checkpoint"
        return "\n".join(
            [
                f"aligned:      {self.aligned}",
                f"fine-tuned:   {self.finetuned} ({kind})",
                f"layer:        {s.layer} of {self.n_layers} (restorable: blocks 0..{s.layer - 1})",
                f"restorable:   {self.restorable_tensors} tensors (norms excluded), "
                f"{self.restorable_params:,} elements",
                f"per step:     {self.per_step:,} elements (rate {s.rate} x "
                f"{self.decoder_params:,} decoder-layer elements), {s.steps} steps, "
                f"warm-up {_warmup(s)}, schedule {s.schedule}",
                f"at most:      {most:,} elements restored",
                f"rollback:     {rollback}",
                f"dtype:        {s.dtype}",
                f"memory:       ~{self.memory['total'] / GIB:.2f} GiB peak ({mem})",
                f"machine:      {self.needs.describe()}",
            ]
        )


def memory_estimate(
    finetuned: Checkpoint, layout: Layout, dtype: torch.dtype, per_step: int, steps: int
) -> dict[str, int]:
    """Peak memory of a run, by part (bytes)."""
    item = dtype.itemsize
    model = sum(math.prod(finetuned.shape(n)) for n in finetuned.names()) * item
    largest = max((t.numel for t in layout.targets), default=0)
    grads = layout.target_params * 4 + largest * item  # fp32 sums, one tensor's .grad
    selection = largest * item + 8 * min(CHUNK, largest) * 4 + 2 * per_step * 20
    ledger = steps * per_step * 4
    parts = {
        "model": model,
        "gradients": grads,
        "selection": selection,
        "ledger": ledger,
        "runtime": RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def _warmup(settings: RecoverSettings) -> str:
    """The warm-up as the plan shows it (``adaptive``'s attempts each take their schedule's)."""
    return "per attempt" if settings.warmup is None else str(settings.warmup)
