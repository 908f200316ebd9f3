"""Merge methods: a registry of small classes, one per method, looked up by name."""

from __future__ import annotations

from safealign.checkpoint import LowRank
from safealign.merge.methods import csulora, safety, standard  # noqa: F401  (they register)
from safealign.merge.methods.base import (
    ALIGNED,
    METHODS,
    ROLES,
    LayerScore,
    MergeMethod,
    MergeParams,
    Param,
    Role,
)

__all__ = [
    "ALIGNED",
    "METHODS",
    "ROLES",
    "LayerScore",
    "LowRank",
    "MergeMethod",
    "MergeParams",
    "Param",
    "Role",
]
