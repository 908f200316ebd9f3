"""A merge resolved before any tensor is read: inputs opened (headers only), how each is read,
what the output is, and the work for every output tensor.

The method declares its inputs (by role or by model reference), which of them are read as LoRA
factors, whose config and tokenizer the output keeps and whether it can write an adapter; the
plan applies those declarations once to the checkpoints on disk, as mergekit resolves its plan
into per-tensor tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safealign.checkpoint import Checkpoint, CheckpointError, validate_checkpoints
from safealign.checkpoint.hub import hub_repo
from safealign.layers import num_decoder_layers
from safealign.merge.config import (
    MergeConfig,
    MergeConfigError,
    ModelEntry,
    layer_position,
    load_config,
    local_path,
    resolve_path,
    resolve_value,
)
from safealign.merge.methods import ALIGNED, METHODS, MergeMethod, MergeParams
from safealign.merge.settings import MergeSettings
from safealign.model import resolve_dtype


@dataclass
class MergePlan:
    """A validated merge: opened checkpoints (headers only) and what the output will be."""

    config: MergeConfig
    method: MergeMethod
    inputs: dict[str, Checkpoint]  # model id (reference, or role) -> checkpoint
    refs: dict[str, str]  # model id -> model reference in the config
    base_id: str | None
    layout: Checkpoint  # the input the tensor names and shapes are read from (all agree)
    names: list[str]
    n_layers: int
    settings: MergeSettings
    #: model ids read as LoRA factors (a factor role that is a LoRA on the base)
    factors: frozenset[str] = frozenset()
    output: str = "model"  # "model" or "adapter"
    source: Checkpoint | None = None  # where config.json and the tokenizer come from

    @property
    def base(self) -> Checkpoint | None:
        return self.inputs.get(self.base_id) if self.base_id else None

    @property
    def copy_source(self) -> Checkpoint:
        """Where tensors that are not floating point are copied from."""
        return self.base if self.base is not None else self.source

    def others(self) -> list[str]:
        return [m for m in self.inputs if m != self.base_id]


@dataclass(frozen=True)
class TensorWork:
    """What to do for one output tensor, resolved before any tensor is read."""

    name: str
    #: the method's parameters for this tensor; None: copied unchanged (not floating point)
    params: MergeParams | None = None
    #: the stored dtype of a merged model tensor (an adapter's factors are stored in fp32)
    dtype: torch.dtype | None = None


def open_reference(config: MergeConfig, ref: str) -> Checkpoint:
    """A model reference: a folder (model or adapter) or mergekit's ``model+adapter``."""
    if "+" in ref:
        model, adapter = ref.split("+", 1)
        return _open(config, adapter, base=_open(config, model))
    return _open(config, ref)


def _open(config: MergeConfig, ref: str, base: Checkpoint | None = None) -> Checkpoint:
    """Open one reference; one fetched from the hub keeps its id (cards name it by id)."""
    checkpoint = Checkpoint.open(resolve_path(config, ref), base=base)
    if not local_path(config, ref).exists():
        checkpoint.hub_repo = hub_repo(ref)
    return checkpoint


def model_id(method: MergeMethod, entry: ModelEntry) -> str:
    """How the method names a model of the config: by its role, or by its reference."""
    return entry.role if method.keyed_by_role else entry.model


def plan_merge(
    config: MergeConfig | str | Path | dict, settings: MergeSettings | None = None
) -> MergePlan:
    """Validate a config against the checkpoints on disk (headers only, no tensor data);
    ``settings`` as for :func:`~safealign.merge.run_merge`."""
    settings = settings or MergeSettings()
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    method = config.method
    refs = {model_id(method, m): m.model for m in config.models}
    base_id = None
    if config.base_model and method.requires_base:
        base_id = ALIGNED.name if method.keyed_by_role else config.base_model
        refs.setdefault(base_id, config.base_model)
    opened = _open_all(config, refs)
    first = opened[base_id] if base_id else next(iter(opened.values()))
    names = first.names()
    n_layers = num_decoder_layers(first.config, names)
    plan = MergePlan(config, method, opened, refs, base_id, first, names, n_layers, settings)
    _refuse_adapters_of_another_base(plan)
    plan.factors = frozenset(
        m for m in plan.others() if m in method.factor_roles and _lora_on(plan.base, opened[m])
    )
    plan.source = _tokenizer_source(plan)
    plan.output = _output_kind(plan, settings.output_type)
    return plan


def _open_all(config: MergeConfig, refs: dict[str, str]) -> dict[str, Checkpoint]:
    problems, opened = [], {}
    for key, ref in refs.items():
        try:
            opened[key] = open_reference(config, ref)
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        raise MergeConfigError("\n".join(problems))
    try:
        validate_checkpoints(*opened.values())
    except CheckpointError as err:
        raise MergeConfigError(str(err)) from None
    return opened


def _refuse_adapters_of_another_base(plan: MergePlan) -> None:
    """A role-keyed merge reads each update over the aligned model: an adapter in a LoRA role
    (fine-tuned, safety) whose base is another model would give a wrong update, so it is
    refused before any tensor is read."""
    if not plan.method.keyed_by_role or plan.base is None:
        return
    problems = [
        f"{role}: {ckpt.path} is a LoRA on {ckpt.base.path}, not on the aligned model "
        f"{plan.base.path}; give a LoRA trained on the aligned model, or the merged model"
        for role, ckpt in plan.inputs.items()
        if role in plan.method.factor_roles and ckpt.is_adapter and ckpt.base.path != plan.base.path
    ]
    if problems:
        raise MergeConfigError("\n".join(problems))


def _lora_on(base: Checkpoint | None, ckpt: Checkpoint) -> bool:
    """A LoRA adapter on ``base`` that replaces no weight: its factors are its whole update."""
    return (
        base is not None
        and ckpt.is_adapter
        and ckpt.base.path == base.path
        and not ckpt.replaced_names()
    )


def _tokenizer_source(plan: MergePlan) -> Checkpoint:
    source = plan.config.tokenizer_source
    if source is None and plan.method.source_role:
        return plan.inputs[plan.method.source_role]
    if source in (None, "base"):
        return plan.base if plan.base is not None else next(iter(plan.inputs.values()))
    for key, ckpt in plan.inputs.items():
        if plan.refs[key] == source:
            return ckpt
    return open_reference(plan.config, source)


def _output_kind(plan: MergePlan, requested: str) -> str:
    method = plan.method
    factor_inputs = [m for m in plan.others() if m in method.factor_roles]
    possible = (
        method.adapter_output
        and bool(factor_inputs)
        and all(m in plan.factors for m in factor_inputs)
    )
    if requested == "adapter" and not possible:
        keeping = [name for name in METHODS if METHODS.get(name).adapter_output]
        raise MergeConfigError(
            f"{method.name}: adapter output needs a method that keeps LoRAs "
            f"({', '.join(keeping)}) and fine-tuned/safety inputs that are LoRAs on base_model"
        )
    if requested == "auto":
        return "adapter" if possible else "model"
    return requested


# ----------------------------------------------------------------------------- per-tensor work


def tensor_params(plan: MergePlan, name: str, selected: bool = False) -> MergeParams:
    """Global and per-model parameters resolved for one tensor (filters, gradients, defaults)."""
    method, config = plan.method, plan.config
    t = layer_position(name, plan.n_layers)
    values = {}
    for p in method.parameters + method.tensor_parameters:
        value = resolve_value(config.parameters.get(p.name), name, t, p.listlike)
        values[p.name] = p.default if value is None else value
    per_model: dict[str, dict[str, Any]] = {}
    specs = {p.name: p for p in method.tensor_parameters}
    for entry in config.models:
        own = {}
        for key, raw in entry.parameters.items():
            if key in specs:
                value = resolve_value(raw, name, t, specs[key].listlike)
                if value is not None:
                    own[key] = value
        per_model[model_id(method, entry)] = own
    return MergeParams(values, per_model, seed=plan.settings.seed, selected=selected)


def tensor_work(plan: MergePlan, selected: set[str]) -> list[TensorWork]:
    """The work for every output tensor: a LoRA target each for an adapter, else every tensor
    (those not floating point copied from the base, or the tokenizer source)."""
    if plan.output == "adapter":
        targets = plan.inputs[plan.method.source_role].lora_targets()
        return [TensorWork(n, tensor_params(plan, n, n in selected)) for n in targets]
    work = []
    for name in plan.names:
        if not plan.copy_source.dtype(name).is_floating_point:
            work.append(TensorWork(name))
        else:
            params = tensor_params(plan, name, name in selected)
            work.append(TensorWork(name, params, _out_dtype(plan, name)))
    return work


def _out_dtype(plan: MergePlan, name: str) -> torch.dtype:
    wanted = plan.config.out_dtype or plan.config.dtype
    if wanted:
        return resolve_dtype(wanted)
    return plan.source.dtype(name)
