"""Build a safety-method config from named roles (the CLI's ``--aligned/--finetuned`` form)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safealign.merge.config import MergeConfig, MergeConfigError, parse_config, validate_config
from safealign.merge.methods import ALIGNED, METHODS, ROLES
from safealign.registry import parse_options, split_spec

#: The methods the ``--method`` shortcut runs: those whose inputs are named by role.
SHORTCUT_METHODS = tuple(name for name in METHODS if METHODS.get(name).required_roles)


def safety_config(
    method: str,
    *,
    aligned: str | Path,
    finetuned: str | Path,
    parameters: dict[str, Any] | None = None,
    dtype: str | None = None,
    **roles: str | Path | None,
) -> MergeConfig:
    """A validated config: ``base_model`` is the aligned model, the others carry their role.

    ``method`` is a name or a spec ``NAME:key=value,...`` whose options are parameters
    (``parameters`` win over them); ``roles`` are the other roles the method takes
    (``unaligned``, ``safety``, ``harmful_model``), ``None`` for one not given. A missing or
    unused role is named by its CLI flag (``resta needs --harmful-model``).
    """
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise TypeError(f"safety_config: unknown role(s) {', '.join(unknown)}")
    name, options = split_spec(method)
    if name in METHODS:
        given = {role for role, value in roles.items() if value is not None}
        problem = role_problem(name, {"finetuned", *given})
        if problem:
            raise MergeConfigError(problem)
    parameters = {**(parse_options(options) if options else {}), **(parameters or {})}
    roles["finetuned"] = finetuned
    models = [
        {"model": str(roles[role]), "parameters": {"role": role}}
        for role in ROLES
        if roles.get(role) is not None
    ]
    data: dict[str, Any] = {"merge_method": name, "base_model": str(aligned), "models": models}
    if parameters:
        data["parameters"] = parameters
    if dtype:
        data["dtype"] = dtype
    config = parse_config(data, f"--method {name}")
    validate_config(config)
    return config


def flag(role: str) -> str:
    """The CLI flag of a role: ``harmful_model`` is ``--harmful-model``."""
    return "--" + role.replace("_", "-")


def role_problem(name: str, given: Iterable[str]) -> str | None:
    """Why the roles ``given`` do not fit method ``name``, in the flags' words (``resta needs
    --harmful-model``, ``resta does not take --unaligned``), or None when they fit. The one role
    check of the shortcut, the CLI and compare; ``aligned`` (the base) is always taken."""
    cls = METHODS.get(name)
    given = set(given)
    missing = [flag(role) for role in cls.required_roles if role not in given]
    if missing:
        return f"{name} needs {' and '.join(missing)}"
    takes = {ALIGNED.name, *cls.required_roles, *cls.optional_roles}
    extra = [flag(role) for role in sorted(given - takes)]
    if extra:
        return f"{name} does not take {', '.join(extra)}"
    return None
