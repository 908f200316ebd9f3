"""Checkpoints on disk: read tensors lazily by name, validate, write sharded and atomically.

A :class:`Checkpoint` is a Hugging Face model folder (``config.json`` plus one or more
safetensors files) or a PEFT LoRA adapter folder on such a base (``reader``; headers in
``header``, the lazy store in ``store``, which refuses NaN and Inf as it reads, LoRA mapping
and the :class:`LowRank` type in ``lora``). :func:`validate_checkpoints` checks a set can be
combined (``validate``).
:class:`CheckpointWriter` and :class:`AdapterWriter` write into a temporary folder beside the
destination and rename it into place only when the write finished (``writer``,
``adapter_writer``), with a :class:`ModelCard` as README.md (``card``).

The names below are the package's API: import them from ``safealign.checkpoint``.
"""

from safealign.checkpoint.adapter_writer import AdapterWriter
from safealign.checkpoint.card import ModelCard
from safealign.checkpoint.files import (
    ADAPTER_CONFIG_NAME,
    CheckpointError,
    allow_pickle,
    pickle_allowed,
)
from safealign.checkpoint.hub import is_adapter
from safealign.checkpoint.lora import LowRank
from safealign.checkpoint.reader import Checkpoint
from safealign.checkpoint.store import check_finite, check_finite_model
from safealign.checkpoint.validate import validate_checkpoints
from safealign.checkpoint.writer import AtomicFolder, CheckpointWriter, check_output, parse_size

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterWriter",
    "AtomicFolder",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "LowRank",
    "ModelCard",
    "allow_pickle",
    "check_finite",
    "check_finite_model",
    "check_output",
    "is_adapter",
    "pickle_allowed",
    "parse_size",
    "validate_checkpoints",
]
