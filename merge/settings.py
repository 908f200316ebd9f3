"""How ``safealign merge`` runs: one settings object for the CLI, API, plan and report."""

from __future__ import annotations

from dataclasses import dataclass

from safealign.merge.methods import METHODS
from safealign.registry import split_spec
from safealign.settings import Settings, SettingsError, setting

OUTPUTS = ("auto", "model", "adapter")
#: The methods the ``--method`` shortcut runs: those whose inputs are named by role.
SHORTCUT_METHODS = tuple(name for name in METHODS if METHODS.get(name).required_roles)


@dataclass
class MergeSettings(Settings):
    """The options of ``safealign merge``, checked on construction.

    :func:`~safealign.merge.run_merge` and :func:`~safealign.merge.plan_merge` read ``device``
    to ``overwrite``. ``method`` and ``dtype`` describe the config of the ``--method`` shortcut
    (the CLI passes them to :func:`~safealign.merge.safety_config`); a merge run from a config
    takes its method and dtype from it, and refuses settings that set them.
    """

    method: str | None = setting(
        None,
        help=f"Shortcut: a safety method ({', '.join(SHORTCUT_METHODS)}), "
        "as NAME or NAME:key=value,...",
    )
    dtype: str | None = setting(
        None, help="Output dtype (overrides a CONFIG's).", default_text="the inputs'"
    )
    device: str = setting("cpu", help="Where tensors are merged.")
    out_shard_size: int | str = setting("5GB", help="Largest output shard.")
    output: str = setting(
        "auto",
        choices=OUTPUTS,
        flag="--output-type",
        help="Write a model, or a LoRA adapter where the method and inputs allow.",
    )
    dry_run: bool = setting(False, help="Validate, print the layer table; write nothing.")
    seed: int = setting(0, help="Seed of DARE's random masks.")
    overwrite: bool = setting(False, help="Replace a non-empty output folder.")

    def check(self) -> None:
        super().check()
        if self.method is not None:
            name, _ = split_spec(self.method)
            if name not in SHORTCUT_METHODS:
                raise SettingsError(
                    f"--method must be one of {', '.join(SHORTCUT_METHODS)}, got {name!r}"
                )
