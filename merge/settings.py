"""How ``safealign merge`` runs: one settings object for the CLI, API, plan and report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from safealign.settings import Settings, setting

OUTPUTS = ("auto", "model", "adapter")


@dataclass
class MergeSettings(Settings):
    """How :func:`~safealign.merge.run_merge` and :func:`~safealign.merge.plan_merge` run a
    config, checked on construction. What is merged (the method, the models, the dtype) is the
    config's; the ``--method`` shortcut and ``--dtype`` only build or change that config."""

    RENAMED: ClassVar[dict[str, str]] = {"output": "output_type"}

    device: str = setting("cpu", help="Where tensors are merged.")
    out_shard_size: int | str = setting("5GB", help="Largest output shard.")
    output_type: str = setting(
        "auto",
        choices=OUTPUTS,
        help="Write a model, or a LoRA adapter where the method and inputs allow.",
    )
    dry_run: bool = setting(False, help="Validate, print the layer table; write nothing.")
    seed: int = setting(0, help="Seed of DARE's random masks.")
    overwrite: bool = setting(False, help="Replace a non-empty output folder.")
