"""The streaming merge engine: one output tensor at a time, inputs read lazily by name.

For each tensor name the engine reads only that tensor from each input (only when the method
asks for it), computes in fp32 on ``device``, casts to the output dtype, hands it to the writer
(shards are flushed as they fill) and frees it. Peak memory is a few tensors, not models.

Layer-wise safety methods first score every layer weight (the per-layer table of
``merge_report.json``, also what ``dry_run``/``score`` print), select layers, then merge.
With LoRA inputs on the aligned model they work on the factors and, where the method allows,
write a LoRA adapter instead of a full model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safealign.checkpoint import (
    AdapterWriter,
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    ModelCard,
    validate_checkpoints,
)
from safealign.layers import num_decoder_layers
from safealign.merge.config import (
    MergeConfig,
    MergeConfigError,
    layer_position,
    load_config,
    resolve_path,
    resolve_value,
)
from safealign.merge.methods import (
    LayerScore,
    LayerwiseSafetyMethod,
    LowRank,
    MergeMethod,
    MergeParams,
    SafetyMethod,
    is_layer_weight,
)
from safealign.model import resolve_dtype

REPORT_NAME = "merge_report.json"
OUTPUTS = ("auto", "model", "adapter")


@dataclass
class MergePlan:
    """A validated merge: opened checkpoints (headers only) and what the output will be."""

    config: MergeConfig
    method: MergeMethod
    inputs: dict[str, Checkpoint]  # model id (reference, or role for safety methods) -> checkpoint
    base_id: str | None
    names: list[str]
    n_layers: int
    output: str  # "model" or "adapter"
    source: Checkpoint  # where config.json and the tokenizer come from

    @property
    def base(self) -> Checkpoint | None:
        return self.inputs.get(self.base_id) if self.base_id else None

    def others(self) -> list[str]:
        return [m for m in self.inputs if m != self.base_id]


@dataclass
class MergeResult:
    out: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def open_reference(config: MergeConfig, ref: str) -> Checkpoint:
    """A model reference: a folder (model or adapter) or mergekit's ``model+adapter``."""
    if "+" in ref:
        model, adapter = ref.split("+", 1)
        return Checkpoint.open(resolve_path(config, adapter), base=resolve_path(config, model))
    return Checkpoint.open(resolve_path(config, ref))


def plan_merge(config: MergeConfig | str | Path | dict, *, output: str = "auto") -> MergePlan:
    """Validate a config against the checkpoints on disk (headers only, no tensor data)."""
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    if output not in OUTPUTS:
        raise MergeConfigError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    method = config.method
    problems, opened = [], {}
    safety = isinstance(method, SafetyMethod)
    refs = {m.role if safety else m.model: m.model for m in config.models}
    base_id = None
    if config.base_model and method.requires_base:
        base_id = "aligned" if safety else config.base_model
        refs.setdefault(base_id, config.base_model)
    for model_id, ref in refs.items():
        try:
            opened[model_id] = open_reference(config, ref)
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        raise MergeConfigError("\n".join(problems))
    try:
        validate_checkpoints(*opened.values())
    except CheckpointError as err:
        raise MergeConfigError(str(err)) from None
    first = opened[base_id] if base_id else next(iter(opened.values()))
    names = first.names()
    n_layers = num_decoder_layers(first.config, names)
    plan = MergePlan(config, method, opened, base_id, names, n_layers, "model", first)
    plan.source = _tokenizer_source(plan)
    plan.output = _output_kind(plan, output)
    return plan


def _tokenizer_source(plan: MergePlan) -> Checkpoint:
    source = plan.config.tokenizer_source
    if source in (None, "base"):
        if isinstance(plan.method, SafetyMethod) and source is None:
            return plan.inputs["finetuned"]
        return plan.base or next(iter(plan.inputs.values()))
    for model_id, ckpt in plan.inputs.items():
        ref = plan.config.role_models().get(model_id, model_id)
        if ref == source:
            return ckpt
    return open_reference(plan.config, source)


def _lora_on_aligned(plan: MergePlan, model_id: str) -> bool:
    ckpt = plan.inputs.get(model_id)
    aligned = plan.base
    return (
        ckpt is not None
        and aligned is not None
        and ckpt.is_adapter
        and ckpt.base.path == aligned.path
        and not ckpt.replaced_names()
    )


def _output_kind(plan: MergePlan, requested: str) -> str:
    method = plan.method
    possible = (
        isinstance(method, SafetyMethod)
        and method.lowrank_output
        and _lora_on_aligned(plan, "finetuned")
        and ("safety" not in plan.inputs or _lora_on_aligned(plan, "safety"))
    )
    if requested == "adapter" and not possible:
        raise MergeConfigError(
            f"{method.name}: adapter output needs a method that keeps LoRAs (safemerge, "
            "safe_lora, interpolate) and fine-tuned/safety inputs that are LoRAs on base_model"
        )
    if requested == "auto":
        return "adapter" if possible else "model"
    return requested


# ----------------------------------------------------------------------------- tensor inputs


class LazyTensors(Mapping):
    """Inputs of one output tensor, read from disk only when the method asks for them.

    Without ``cache`` every access reads again and nothing is kept: a method that streams over
    the models (linear, task arithmetic, TIES) holds one input at a time.
    """

    def __init__(self, loaders: dict[str, Callable[[], Any]], *, cache: bool):
        self._loaders = loaders
        self._values: dict[str, Any] | None = {} if cache else None

    def __getitem__(self, key: str) -> Any:
        if self._values is None:
            return self._loaders[key]()
        if key not in self._values:
            self._values[key] = self._loaders[key]()
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def _read(ckpt: Checkpoint, name: str, device: str) -> torch.Tensor:
    """One tensor in fp32; the file handles are dropped at once, so the pages mapped to read it
    leave the process and resident memory stays at the tensors actually held."""
    tensor = ckpt.get(name, torch.float32).to(device)
    ckpt.close()
    return tensor


def _reader(ckpt: Checkpoint, name: str, device: str) -> Callable[[], torch.Tensor]:
    return lambda: _read(ckpt, name, device)


def _update_reader(
    plan: MergePlan, model_id: str, name: str, device: str, aligned: Callable[[], torch.Tensor]
) -> Callable[[], Any]:
    """A LoRA on the aligned model gives its factors; a weight it leaves alone, a rank-0 update."""
    ckpt = plan.inputs[model_id]
    if not _lora_on_aligned(plan, model_id):
        return _reader(ckpt, name, device)

    def read():
        factors = ckpt.lora_factors(name)
        ckpt.close()
        if factors is None:
            shape = aligned().shape
            if len(shape) != 2:
                return aligned()
            zeros = torch.zeros
            return LowRank(zeros(0, shape[1], device=device), zeros(shape[0], 0, device=device))
        return LowRank(factors.A.to(device), factors.B.to(device), factors.scale)

    return read


def tensor_inputs(
    plan: MergePlan, name: str, device: str
) -> tuple[LazyTensors, torch.Tensor | None]:
    """The method's inputs for one tensor, and the base tensor (read now, it is always used)."""
    base = _read(plan.base, name, device) if plan.base is not None else None
    loaders: dict[str, Callable[[], Any]] = {}
    for model_id in plan.others():
        if isinstance(plan.method, SafetyMethod) and model_id in ("finetuned", "safety"):
            loaders[model_id] = _update_reader(plan, model_id, name, device, lambda: base)
        else:
            loaders[model_id] = _reader(plan.inputs[model_id], name, device)
    return LazyTensors(loaders, cache=isinstance(plan.method, SafetyMethod)), base


def tensor_params(plan: MergePlan, name: str, seed: int, selected: bool = False) -> MergeParams:
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
        model_id = entry.role if isinstance(method, SafetyMethod) else entry.model
        own = {}
        for key, raw in entry.parameters.items():
            if key in specs:
                value = resolve_value(raw, name, t, specs[key].listlike)
                if value is not None:
                    own[key] = value
        per_model[model_id] = own
    return MergeParams(values, per_model, seed=seed, selected=selected)


# ----------------------------------------------------------------------------- scoring


def layer_names(plan: MergePlan) -> list[str]:
    """The layer weights a layer-wise method scores (only a LoRA's targets, for a LoRA)."""
    if not isinstance(plan.method, LayerwiseSafetyMethod):
        return []
    names = [n for n in plan.names if is_layer_weight(n, len(plan.source.shape(n)))]
    finetuned = plan.inputs["finetuned"]
    if _lora_on_aligned(plan, "finetuned"):
        targets = set(finetuned.lora_targets())
        names = [n for n in names if n in targets]
    return names


def score_layers(
    plan: MergePlan, *, device: str = "cpu", progress: bool = True
) -> list[LayerScore]:
    """ρ and norms for every layer weight the method scores."""
    method = plan.method
    scores = []
    for name in tqdm(layer_names(plan), desc="scoring layers", disable=not progress):
        tensors, base = tensor_inputs(plan, name, device)
        scores.append(method.score(name, tensors, base))
        del tensors, base
    return scores


# ----------------------------------------------------------------------------- merging


def run_merge(
    config: MergeConfig | str | Path | dict,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    out_shard_size: int | str = "5GB",
    dry_run: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    output: str = "auto",
    progress: bool = True,
) -> MergeResult:
    """Run a merge from a config (YAML path, data, or :class:`MergeConfig`).

    ``dry_run`` validates, scores layers (layer-wise methods) and returns the report without
    writing anything. Otherwise the merged model (or LoRA adapter) is written to ``out`` with its
    model card and ``merge_report.json``.
    """
    start = time.perf_counter()
    plan = plan_merge(config, output=output)
    if not dry_run and out is None:
        raise MergeConfigError("an output folder is required (out)")
    scores = score_layers(plan, device=device, progress=progress)
    selected = plan.method.select(scores, _global_params(plan, seed)) if scores else set()
    report = _report(plan, scores, selected, seed)
    if dry_run:
        report["seconds"] = round(time.perf_counter() - start, 3)
        return MergeResult(None, report)
    inputs = list(plan.inputs.values())
    if plan.output == "adapter":
        writer = AdapterWriter(
            out, source=plan.inputs["finetuned"], overwrite=overwrite, inputs=inputs
        )
    else:
        writer = CheckpointWriter(
            out,
            source=plan.source,
            max_shard_size=out_shard_size,
            overwrite=overwrite,
            inputs=inputs,
        )
    with writer:
        if plan.output == "adapter":
            _merge_adapter(plan, writer, selected, seed, device, progress)
        else:
            _merge_model(plan, writer, selected, seed, device, progress)
        report["seconds"] = round(time.perf_counter() - start, 3)
        from safealign.report import write_json

        write_json(writer.folder / REPORT_NAME, report)
        path = writer.finish(_card(plan, report, Path(out)))
    return MergeResult(path, report)


def _global_params(plan: MergePlan, seed: int) -> MergeParams:
    return tensor_params(plan, "", seed)


def _out_dtype(plan: MergePlan, name: str) -> torch.dtype:
    wanted = plan.config.out_dtype or plan.config.dtype
    if wanted:
        return resolve_dtype(wanted)
    return plan.source.dtype(name)


def _merge_model(plan, writer, selected, seed, device, progress) -> None:
    method = plan.method
    for name in tqdm(plan.names, desc=f"merging ({method.name})", disable=not progress):
        source = plan.base or plan.source
        if not source.dtype(name).is_floating_point:
            writer.add(name, source.get(name))
            source.close()
            continue
        tensors, base = tensor_inputs(plan, name, device)
        params = tensor_params(plan, name, seed, selected=name in selected)
        merged = method.merge(name, tensors, base, params)
        writer.add(name, merged.to(_out_dtype(plan, name)).cpu())
        del tensors, base, merged


def _merge_adapter(plan, writer, selected, seed, device, progress) -> None:
    method = plan.method
    finetuned = plan.inputs["finetuned"]
    for name in tqdm(
        finetuned.lora_targets(), desc=f"merging ({method.name}, LoRA)", disable=not progress
    ):
        tensors, base = tensor_inputs(plan, name, device)
        params = tensor_params(plan, name, seed, selected=name in selected)
        merged = method.merge_lowrank(name, tensors, base, params)
        writer.add(name, merged.A.float().cpu(), merged.B.float().cpu(), merged.scale)
        del tensors, base, merged


def _report(plan: MergePlan, scores: list[LayerScore], selected: set[str], seed: int) -> dict:
    rows = []
    for s in scores:
        row = s.to_dict()
        row["rho"] = None if math.isnan(s.rho) else s.rho
        row["selected"] = s.name in selected
        rows.append(row)
    return {
        "method": plan.method.name,
        "output": plan.output,
        "seed": seed,
        "config": plan.config.to_dict(),
        "parameters": _global_params(plan, seed).global_,
        "layers_scored": len(scores),
        "layers_selected": len(selected),
        "layers": rows,
    }


def _card(plan: MergePlan, report: dict, out: Path) -> ModelCard:
    config = plan.config
    inputs = {model_id: str(ckpt.path) for model_id, ckpt in plan.inputs.items()}
    results = None
    if report["layers_scored"]:
        results = {
            "layers scored": report["layers_scored"],
            "layers selected": report["layers_selected"],
        }
    settings = {"merge config": config.to_dict(), "seed": report["seed"]}
    return ModelCard(
        title=out.name,
        method=f"merge/{plan.method.name}",
        summary=f"Merged with safealign `{plan.method.name}`: {plan.method.summary}.",
        settings=settings,
        inputs=inputs,
        results=results,
    )


def return_freed_tensors_to_os() -> None:
    """Have glibc serve every allocation of 1 MiB or more by its own mapping (process-wide).

    glibc otherwise raises its mmap threshold after large frees and serves later tensors from
    the heap, which the output shard held in memory pins: resident memory then creeps up with
    the number of tensors read. A no-op where glibc's ``mallopt`` is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)


def layer_table(report: dict) -> str:
    """The per-layer table (ρ, norms, selected) as markdown."""
    from safealign.report import markdown_table

    columns = ["name", "rho", "norm_v", "norm_update", "norm_projected", "selected"]
    return markdown_table(report["layers"], columns)
