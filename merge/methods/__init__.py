"""Merge methods: a registry of small classes, one per method, looked up by name."""

from __future__ import annotations

from safealign.checkpoint import LowRank
from safealign.merge.methods.base import MergeMethod, MergeParams, Param
from safealign.merge.methods.safety import (
    SAFETY_METHODS,
    LayerScore,
    LayerwiseSafetyMethod,
    SafetyMethod,
    is_layer_weight,
)
from safealign.merge.methods.standard import STANDARD_METHODS

METHODS: dict[str, type[MergeMethod]] = {m.name: m for m in STANDARD_METHODS + SAFETY_METHODS}


def get_method(name: str) -> MergeMethod:
    """An instance of the method registered under ``name``."""
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}: choose one of {', '.join(METHODS)}"
        ) from None


__all__ = [
    "METHODS",
    "LayerScore",
    "LayerwiseSafetyMethod",
    "LowRank",
    "MergeMethod",
    "MergeParams",
    "Param",
    "SafetyMethod",
    "get_method",
    "is_layer_weight",
]
