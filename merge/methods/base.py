"""The merge-method interface: one small class per method, registered by name in :data:`METHODS`.

Every method works on one output tensor at a time, in fp32::

    method.merge(name, tensors, base, params) -> Tensor

``tensors`` maps a model id to that model's tensor; ``base`` is the base model's tensor (``None``
for methods without a base). ``params`` holds the global parameters and each model's parameters,
already resolved for this tensor name.

A method declares everything the engine needs to feed it, so the engine never asks what kind of
method it runs: its inputs (models named by reference, as in mergekit, or by role), how each
input is read (dense weights, or a LoRA's factors), whether inputs are cached for re-reading,
whose config and tokenizer the output keeps, whether it can write a LoRA adapter, and which
tensors it scores before merging.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from safealign.registry import Registry

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Param:
    """A declared parameter: its default (``required`` when there is none) and a value check.

    ``check`` returns ``None`` for a good value, else a short phrase saying what is wrong.
    """

    name: str
    default: Any = None
    required: bool = False
    check: Check | None = None
    help: str = ""
    #: the value itself is a list (not a gradient over layers)
    listlike: bool = False

    def problem(self, value: Any) -> str | None:
        return self.check(value) if self.check is not None else None


@dataclass
class MergeParams:
    """Parameters for one output tensor: global ones and each input model's own."""

    global_: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    #: layer-wise safety methods: whether this tensor's layer was selected for repair
    selected: bool = False

    def of(self, model: str, name: str) -> Any:
        """A per-model parameter, falling back to the global value of the same name."""
        own = self.per_model.get(model, {})
        return own[name] if name in own else self.global_[name]


@dataclass(frozen=True)
class Role:
    """A part a model plays in a role-keyed merge (its ``role`` parameter, or a shortcut flag)."""

    name: str
    help: str


#: The base model of a role-keyed merge (its ``base_model``).
ALIGNED = Role("aligned", "the aligned model A")
#: The roles a model of a role-keyed merge may take, by name.
ROLES = {
    role.name: role
    for role in (
        Role("finetuned", "fine-tuned B"),
        Role("unaligned", "model U before alignment (safe_lora, safemerge, csulora)"),
        Role("safety", "safety LoRA S on A (safemerge)"),
        Role("harmful_model", "A fine-tuned on harmful data, RESTA's unaligned model (resta)"),
    )
}


@dataclass(frozen=True)
class LayerScore:
    """One row of the per-layer table of a method that scores layers: ρ and its norms."""

    name: str
    rho: float
    norm_v: float
    norm_update: float
    norm_projected: float

    def to_dict(self) -> dict:
        return asdict(self)


class MergeMethod(ABC):
    """A merge method: declares its parameters and inputs, implements :meth:`merge`."""

    name: ClassVar[str]  # set by METHODS.register
    summary: ClassVar[str]
    requires_base: ClassVar[bool] = False
    #: parameters that apply to the whole merge
    parameters: ClassVar[tuple[Param, ...]] = ()
    #: parameters that may be set per input model (or globally, as their default)
    tensor_parameters: ClassVar[tuple[Param, ...]] = ()
    #: exact number of non-base input models, when the method fixes it
    n_models: ClassVar[int | None] = None
    #: inputs named by role (each model's ``role`` parameter; the base model is ``aligned``):
    #: the roles that must be given, then those that may. Empty: inputs are named by their
    #: model reference and any number may be given, as in mergekit.
    required_roles: ClassVar[tuple[str, ...]] = ()
    optional_roles: ClassVar[tuple[str, ...]] = ()
    #: roles read as their LoRA factors (:class:`LowRank`) when the model is a LoRA on the base
    #: model; every other input is read as dense weights
    factor_roles: ClassVar[tuple[str, ...]] = ()
    #: keep each input tensor once read (a method that reads an input several times); without
    #: it every access reads again, so a method streaming over its models holds one at a time
    cache_inputs: ClassVar[bool] = False
    #: the role whose config and tokenizer the output keeps when the merge config names no
    #: ``tokenizer_source`` (None: the base model, else the first model); an adapter output
    #: is a LoRA with this role's targets
    source_role: ClassVar[str | None] = None
    #: can write a LoRA adapter (:meth:`merge_lowrank`) when every factor-role input is a LoRA
    #: on the base model
    adapter_output: ClassVar[bool] = False

    @property
    def keyed_by_role(self) -> bool:
        """Whether inputs are named by role rather than by model reference."""
        return bool(self.required_roles)

    @abstractmethod
    def merge(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        base: torch.Tensor | None,
        params: MergeParams,
    ) -> torch.Tensor:
        """Merge one tensor; all inputs are fp32 and share a shape."""

    def scores(self, name: str, ndim: int) -> bool:
        """Whether the tensor ``name`` is scored (and may be selected) before merging."""
        return False

    def score(self, name: str, tensors: Mapping[str, Any], base: torch.Tensor) -> LayerScore:
        """The score of one tensor :meth:`scores` names."""
        raise NotImplementedError(f"{self.name} scores no tensor")

    def select(self, scores: list[LayerScore], params: MergeParams) -> set[str]:
        """Names of the scored tensors to repair."""
        raise NotImplementedError(f"{self.name} scores no tensor")

    def merge_lowrank(
        self, name: str, tensors: Mapping[str, Any], base: torch.Tensor, params: MergeParams
    ) -> Any:
        """Merge one LoRA target into a :class:`LowRank` (methods with ``adapter_output``)."""
        raise NotImplementedError(f"{self.name} cannot produce a LoRA")


#: Every merge method, by name (``METHODS.create(name)`` gives an instance).
METHODS: Registry[type[MergeMethod]] = Registry("merge method")


# Value checks shared by the methods: each returns None when good, else what is wrong.


def number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {value!r}"
    return None


def density(value: Any) -> str | None:
    if number(value) is not None or not 0.0 < value <= 1.0:
        return f"must be a number in (0, 1], got {value!r}"
    return None


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def weight_pair(value: Any) -> str | None:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or any(number(v) is not None for v in value)
    ):
        return f"must be a pair of numbers [finetuned, safety], got {value!r}"
    return None
