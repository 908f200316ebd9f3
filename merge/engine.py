"""The streaming merge engine: one output tensor at a time, inputs read lazily by name.

For each tensor of the plan's work the engine reads only that tensor from each input (only when
the method asks for it), computes in fp32 on ``device``, casts to the output dtype, hands it to
the writer (shards are flushed as they fill) and frees it. Peak memory is a few tensors, not
models. What is read, and how (dense weights or a LoRA's factors), the plan decided once from
the method's declarations; the engine asks nothing of the method but to score, select and merge.

A method that scores tensors (the layer-wise safety methods) first scores every tensor it names
(the per-layer table of ``merge_report.json``, also what ``dry_run`` prints), selects some, then
merges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safealign.checkpoint import AdapterWriter, Checkpoint, CheckpointWriter
from safealign.merge.config import MergeConfig, MergeConfigError
from safealign.merge.methods import LayerScore, LowRank
from safealign.merge.plan import MergePlan, TensorWork, plan_merge, tensor_params, tensor_work
from safealign.merge.report import REPORT_NAME, merge_report, model_card
from safealign.merge.settings import MergeSettings
from safealign.progress import ProgressCallback
from safealign.report import write_json
from safealign.resources import streaming_estimate, tensor_bytes


@dataclass
class MergeResult:
    out: Path | None
    report: dict[str, Any] = field(default_factory=dict)


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


def _factor_reader(
    ckpt: Checkpoint, name: str, device: str, base: torch.Tensor
) -> Callable[[], Any]:
    """A LoRA on the base gives its factors; a weight it leaves alone, a rank-0 update."""

    def read():
        factors = ckpt.lora_factors(name)
        ckpt.close()
        if factors is None:
            shape = base.shape
            if len(shape) != 2:
                return base
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
        ckpt = plan.inputs[model_id]
        if model_id in plan.factors:
            loaders[model_id] = _factor_reader(ckpt, name, device, base)
        else:
            loaders[model_id] = _reader(ckpt, name, device)
    return LazyTensors(loaders, cache=plan.method.cache_inputs), base


# ----------------------------------------------------------------------------- scoring


def layer_names(plan: MergePlan) -> list[str]:
    """The tensors the method scores (only the source role's LoRA targets, for a LoRA)."""
    method = plan.method
    names = [n for n in plan.names if method.scores(n, len(plan.layout.shape(n)))]
    if names and method.source_role in plan.factors:
        targets = set(plan.inputs[method.source_role].lora_targets())
        names = [n for n in names if n in targets]
    return names


def score_layers(
    plan: MergePlan, *, device: str | None = None, bars: bool = False
) -> list[LayerScore]:
    """ρ and norms for every tensor the method scores (``device``: the plan's by default;
    ``bars``: a progress bar on stderr)."""
    device = device or plan.settings.device
    scores = []
    for name in tqdm(layer_names(plan), desc="scoring layers", disable=not bars):
        tensors, base = tensor_inputs(plan, name, device)
        scores.append(plan.method.score(name, tensors, base))
        del tensors, base
    return scores


# ----------------------------------------------------------------------------- merging


def run_merge(
    config: MergeConfig | str | Path | dict,
    settings: MergeSettings | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
) -> MergeResult:
    """Run a merge from a config (YAML path, data, or :class:`MergeConfig`: the inputs).

    ``settings``: a :class:`MergeSettings` (default: the defaults). ``settings.dry_run``
    validates, scores layers (layer-wise methods) and returns the report without writing
    anything (``out`` may then be None). Otherwise the merged model (or LoRA adapter) is
    written to ``out`` with its model card and ``merge_report.json``. ``progress``: with a
    callback, progress bars on stderr (the merge has no status lines of its own).

    The CLI also tunes the allocator (:func:`return_freed_tensors_to_os`); the API does not, as
    that setting is process-wide and permanent: call it first in a process that only merges.
    """
    start = time.perf_counter()
    plan = plan_merge(config, settings)
    settings = plan.settings
    bars = progress is not None
    if not settings.dry_run and out is None:
        raise MergeConfigError("an output folder is required (out)")
    written = tensor_bytes(plan.layout) if plan.output != "adapter" else 0
    needs = streaming_estimate(list(plan.inputs.values()), written, None if out is None else out)
    if not settings.dry_run:
        needs.check("merge")  # before scoring and merging: a clear refusal, not an OOM kill
    scores = score_layers(plan, bars=bars)
    selected = plan.method.select(scores, tensor_params(plan, "")) if scores else set()
    report = merge_report(plan, scores, selected)
    if settings.dry_run:
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["needs"] = needs.describe()
        return MergeResult(None, report)
    work = tensor_work(plan, selected)
    with _writer(plan, Path(out)) as writer:
        if plan.output == "adapter":
            _merge_adapter(plan, writer, work, bars)
        else:
            _merge_model(plan, writer, work, bars)
        report["seconds"] = round(time.perf_counter() - start, 3)
        write_json(writer.folder / REPORT_NAME, report)
        path = writer.finish(model_card(plan, report, Path(out)))
    return MergeResult(path, report)


def _writer(plan: MergePlan, out: Path) -> AdapterWriter | CheckpointWriter:
    inputs = list(plan.inputs.values())
    overwrite = plan.settings.overwrite
    if plan.output == "adapter":
        source = plan.inputs[plan.method.source_role]
        return AdapterWriter(out, source=source, overwrite=overwrite, inputs=inputs)
    return CheckpointWriter(
        out,
        source=plan.source,
        max_shard_size=plan.settings.out_shard_size,
        overwrite=overwrite,
        inputs=inputs,
    )


def _merge_model(plan: MergePlan, writer, work: list[TensorWork], bars: bool) -> None:
    method, device, copy_from = plan.method, plan.settings.device, plan.copy_source
    for item in tqdm(work, desc=f"merging ({method.name})", disable=not bars):
        if item.params is None:
            writer.add(item.name, copy_from.get(item.name))
            copy_from.close()
            continue
        tensors, base = tensor_inputs(plan, item.name, device)
        merged = method.merge(item.name, tensors, base, item.params)
        writer.add(item.name, merged.to(item.dtype).cpu())
        del tensors, base, merged


def _merge_adapter(plan: MergePlan, writer, work: list[TensorWork], bars: bool) -> None:
    method, device = plan.method, plan.settings.device
    for item in tqdm(work, desc=f"merging ({method.name}, LoRA)", disable=not bars):
        tensors, base = tensor_inputs(plan, item.name, device)
        merged = method.merge_lowrank(item.name, tensors, base, item.params)
        writer.add(item.name, merged.A.float().cpu(), merged.B.float().cpu(), merged.scale)
        del tensors, base, merged


def return_freed_tensors_to_os() -> None:
    """Have glibc serve every allocation of 1 MiB or more by its own mapping (process-wide).

    glibc otherwise raises its mmap threshold after large frees and serves later tensors from
    the heap, which the output shard held in memory pins: resident memory then creeps up with
    the number of tensors read. A no-op where glibc's ``mallopt`` is absent.

    The ``safealign merge`` command calls it; :func:`run_merge` does not. Setting the threshold
    turns glibc's adaptive threshold off for the rest of the process (it cannot be turned back
    on), and every large tensor then costs a fresh mapping: a host process that also runs models
    (the demo, a notebook, the tests) would pay that on all its later work. Call it first in a
    process that only merges, as the CLI and ``benchmarks/bench_merge.py`` do.
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
