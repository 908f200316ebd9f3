"""Merge configs in mergekit's YAML format, validated in full before any tensor is read.

Accepted keys: ``merge_method``, ``models`` (each ``{model, parameters}``), ``base_model``,
``parameters`` (global), ``dtype``, ``out_dtype``, ``tokenizer_source`` or ``tokenizer: {source}``.
A model is a local folder or a hub id (``org/name``, ``org/name@revision``; see
:mod:`safealign.checkpoint.hub`): a model, a PEFT LoRA adapter (on the base named in its config), or
mergekit's ``model+adapter`` form. Parameter values are numbers/booleans/strings, a list of numbers
(a gradient over the decoder layers), or a list of ``{filter, value}`` (first filter contained in
the tensor name wins; no filter matches all), as in mergekit.

The safety methods name each model's part with a per-model ``role`` parameter (``finetuned``,
``unaligned``, ``safety``); ``base_model`` is the aligned model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from safealign.checkpoint import CheckpointError
from safealign.checkpoint.hub import hub_snapshot, is_hub_id
from safealign.layers import layer_index
from safealign.merge.methods import METHODS, ROLES, MergeMethod
from safealign.model import DTYPES

TOP_KEYS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}
UNSUPPORTED_KEYS = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models",
    "modules": "per-module configs are not supported; list whole models",
    "chat_template": "chat_template is not supported; the tokenizer source's template is kept",
}


class MergeConfigError(ValueError):
    """A merge config cannot run; one line per problem."""


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        return self.parameters.get("role")


@dataclass(frozen=True)
class MergeConfig:
    """A parsed merge config (frozen: a run never changes what it was given);
    :func:`validate_config` checks it against the method and disk."""

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    source_path: Path | None = None

    @property
    def method(self) -> MergeMethod:
        return METHODS.create(self.merge_method)

    def to_dict(self) -> dict[str, Any]:
        """The config as mergekit-style YAML data (what the model card records)."""
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        data["models"] = [
            {"model": m.model, **({"parameters": m.parameters} if m.parameters else {})}
            for m in self.models
        ]
        for key in ("parameters", "dtype", "out_dtype", "tokenizer_source"):
            value = getattr(self, key)
            if value:
                data[key] = value
        return data


def load_config(source: str | Path | dict) -> MergeConfig:
    """Parse a YAML file (or already-loaded data) and validate it in full."""
    if isinstance(source, dict):
        data, where, folder = source, "config", None
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MergeConfigError(f"merge config not found: {path}") from None
        except yaml.YAMLError as err:
            raise MergeConfigError(f"invalid YAML ({err}): {path}".replace("\n", " ")) from None
        folder = path.resolve().parent
    config = replace(parse_config(data, where), source_path=folder)
    validate_config(config)
    return config


def parse_config(data: Any, where: str = "config") -> MergeConfig:
    """Shape checks only (keys and types); collect every problem before raising."""
    if not isinstance(data, dict):
        raise MergeConfigError(f"{where}: a merge config must be a mapping")
    problems = []
    for key in data:
        if key in UNSUPPORTED_KEYS:
            problems.append(f"{where}: {key}: {UNSUPPORTED_KEYS[key]}")
        elif key not in TOP_KEYS:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(TOP_KEYS))})")
    method = data.get("merge_method")
    if method is None:
        problems.append(f"{where}: merge_method is missing (one of {', '.join(METHODS)})")
    elif not isinstance(method, str) or method not in METHODS:
        problems.append(f"{where}: unknown merge_method {method!r} (one of {', '.join(METHODS)})")
    models = _parse_models(data.get("models"), where, problems)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        problems.append(f"{where}: parameters must be a mapping")
        params = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or value.lower() not in DTYPES):
            problems.append(f"{where}: {key} {value!r} is not one of {', '.join(DTYPES)}")
    tokenizer = data.get("tokenizer_source")
    if isinstance(data.get("tokenizer"), dict):
        extra = set(data["tokenizer"]) - {"source"}
        if extra:
            problems.append(f"{where}: tokenizer: unsupported key(s) {', '.join(sorted(extra))}")
        tokenizer = data["tokenizer"].get("source", tokenizer)
    elif data.get("tokenizer") is not None:
        problems.append(f"{where}: tokenizer must be a mapping like {{source: base}}")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        problems.append(f"{where}: base_model must be a path")
    if problems:
        raise MergeConfigError("\n".join(problems))
    return MergeConfig(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=dict(params),
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        tokenizer_source=tokenizer,
    )


def _parse_models(raw_models: Any, where: str, problems: list[str]) -> list[ModelEntry]:
    """The ``models`` list; each problem is appended to ``problems``."""
    if not isinstance(raw_models, list) or not raw_models:
        problems.append(f"{where}: models must be a non-empty list of {{model, parameters}}")
        return []
    models = []
    for i, entry in enumerate(raw_models):
        at = f"{where}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            problems.append(f"{at}: needs a 'model' path")
            continue
        extra = set(entry) - {"model", "parameters"}
        if extra:
            problems.append(f"{at}: unknown key(s) {', '.join(sorted(extra))}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"{at}: parameters must be a mapping")
            params = {}
        models.append(ModelEntry(entry["model"], dict(params)))
    return models


def validate_config(config: MergeConfig) -> None:
    """Check parameters against the method, roles, and that every model folder exists (hub
    ids: fetched, or found in the hub cache)."""
    method = config.method
    problems = _check_structure(config, method)
    problems += _check_parameters(config, method)
    problems += _check_paths(config)
    if problems:
        raise MergeConfigError("\n".join(problems))


def _check_structure(config: MergeConfig, method: MergeMethod) -> list[str]:
    problems = []
    name = method.name
    if method.requires_base and not config.base_model:
        problems.append(f"{name}: base_model is required")
    refs = [m.model for m in config.models]
    duplicates = sorted({r for r in refs if refs.count(r) > 1})
    if duplicates:
        problems.append(f"models listed twice: {', '.join(duplicates)}")
    others = [m for m in config.models if m.model != config.base_model or not method.requires_base]
    if method.n_models is not None and len(others) != method.n_models:
        problems.append(f"{name}: needs exactly {method.n_models} model(s) besides base_model")
    if method.keyed_by_role:
        problems += _check_roles(config, method)
    elif not others:
        problems.append(f"{name}: needs at least one model besides base_model")
    return problems


def _check_roles(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Each model names a known role; each required role once, each optional one at most once."""
    name = method.name
    problems = []
    roles = [m.role for m in config.models]
    for m in config.models:
        if m.role not in ROLES:
            problems.append(
                f"{name}: model {m.model}: parameter role must be one of {', '.join(ROLES)}"
            )
    for role in method.required_roles:
        if roles.count(role) != 1:
            problems.append(f"{name}: exactly one model needs role: {role}")
    allowed = set(method.required_roles) | set(method.optional_roles)
    for role in dict.fromkeys(roles):
        if role in ROLES and role not in allowed:
            problems.append(f"{name}: role {role} is not used by this method")
    for role in method.optional_roles:
        if roles.count(role) > 1:
            problems.append(f"{name}: at most one model may have role: {role}")
    return problems


def parameter_problems(method: str, parameters: dict[str, Any]) -> list[str]:
    """What is wrong with a merge's global ``parameters`` for ``method`` (unknown names, bad
    values), from the method's declarations alone: no input is read."""
    cls = METHODS.get(method)
    shared = {p.name: p for p in cls.parameters}
    per_model = {p.name: p for p in cls.tensor_parameters}
    problems = []
    for key, value in parameters.items():
        spec = shared.get(key) or per_model.get(key)
        if spec is None:
            problems.append(f"{method}: unknown parameter {key!r}{_known(shared, per_model)}")
        else:
            problems += _check_value(f"parameters.{key}", spec, value)
    return problems


def _check_parameters(config: MergeConfig, method: MergeMethod) -> list[str]:
    problems = parameter_problems(method.name, config.parameters)
    shared = {p.name: p for p in method.parameters}
    per_model = {p.name: p for p in method.tensor_parameters}
    for p in shared.values():
        if p.required and p.name not in config.parameters:
            problems.append(f"{method.name}: parameter {p.name} is required")
    role_key = {"role"} if method.keyed_by_role else set()
    for m in config.models:
        for key, value in m.parameters.items():
            if key in role_key:
                continue
            spec = per_model.get(key)
            if spec is None:
                hint = " (a global parameter: set it under parameters)" if key in shared else ""
                problems.append(f"{method.name}: model {m.model}: unknown parameter {key!r}{hint}")
            else:
                problems += _check_value(f"model {m.model}: {key}", spec, value)
        is_base = m.model == config.base_model and method.requires_base
        for p in per_model.values():
            if p.required and not is_base and p.name not in m.parameters:
                if p.name not in config.parameters:
                    problems.append(
                        f"{method.name}: model {m.model}: parameter {p.name} is required"
                    )
    return problems


def _known(shared: dict, per_model: dict) -> str:
    names = sorted(set(shared) | set(per_model))
    return f" (known: {', '.join(names)})" if names else " (this method takes none)"


def _check_value(where: str, spec, value: Any) -> list[str]:
    """Check a scalar, a gradient list, or a list of {filter, value} conditions."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        problems = []
        for i, cond in enumerate(value):
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                problems.append(f"{where}[{i}]: a condition is {{filter, value}}")
                continue
            problems += _check_value(f"{where}[{i}].value", spec, cond["value"])
        return problems
    if isinstance(value, list) and not spec.listlike:
        if not value:
            return [f"{where}: empty list"]
        return [f"{where}: {msg}" for v in value if (msg := spec.problem(v))]
    msg = spec.problem(value)
    return [f"{where}: {msg}"] if msg else []


def _check_paths(config: MergeConfig) -> list[str]:
    problems = []
    refs = [m.model for m in config.models]
    if config.base_model and config.base_model not in refs:
        refs.append(config.base_model)
    source = config.tokenizer_source
    if source not in (None, "base") and source not in refs:
        if source == "union":
            problems.append("tokenizer_source union is not supported: use base or a model")
        else:
            refs.append(source)
    for ref in refs:
        for part in ref.split("+"):
            try:
                folder = resolve_path(config, part)
            except CheckpointError as err:
                problems.append(str(err))
                continue
            if not folder.is_dir():
                where = "" if str(folder) == part else f" ({folder})"  # a relative ref's folder
                problems.append(f"model folder not found: {part}{where}")
    return problems


def resolve_path(config: MergeConfig, ref: str) -> Path:
    """A model reference's folder: a path (relative to the config file's folder), else a hub
    id's snapshot folder (a :class:`CheckpointError` when it cannot be had)."""
    path = local_path(config, ref)
    if path.exists() or not is_hub_id(ref):
        return path
    return hub_snapshot(ref)


def local_path(config: MergeConfig, ref: str) -> Path:
    """Where a reference would be on disk: relative paths are relative to the config's folder."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and config.source_path is not None:
        path = config.source_path / path
    return path


def resolve_value(value: Any, tensor_name: str, t: float, listlike: bool = False) -> Any:
    """mergekit's rule for one tensor: filters by substring, gradients interpolated at ``t``.

    ``None`` when no filter matches (the next, lower-precedence setting applies).
    """
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for cond in value:
            flt = cond.get("filter")
            if flt in (None, "*") or flt in tensor_name:
                return resolve_value(cond["value"], tensor_name, t, listlike)
        return None
    if listlike:
        return value
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value


def layer_position(tensor_name: str, n_layers: int) -> float:
    """mergekit's ``t`` for gradients: i/(n-1) for decoder layer i, 0 for other tensors."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    return index / (n_layers - 1) if n_layers > 1 else 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
