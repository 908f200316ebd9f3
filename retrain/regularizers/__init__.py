"""The regularizers registry: ``NAME`` or ``NAME:key=value,...``, each key a field of the
regularizer's own settings class, which holds its default."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from typing import Any

from safealign.command import OldSpelling
from safealign.registry import Registry, RegistryError, parse_options, split_spec
from safealign.retrain.regularizers.adaptive import AdaptiveKL, AdaptiveKLSettings
from safealign.retrain.regularizers.base import Regularizer, RegularizerSettings, Run
from safealign.retrain.regularizers.divergence import (
    KL,
    LDIFS,
    SFT,
    EpochKL,
    EpochKLSettings,
    KLSettings,
    LDIFSSettings,
    SFTSettings,
)
from safealign.retrain.regularizers.interleave import Interleave, InterleaveSettings
from safealign.retrain.regularizers.replay import DER, DERSettings
from safealign.retrain.regularizers.weights import EMA, L2, EMASettings, L2Settings

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")
for _cls in (SFT, KL, EpochKL, AdaptiveKL, DER, L2, EMA, LDIFS, Interleave):
    REGULARIZERS.register(_cls.settings_class.regularizer)(_cls)


def _old_names() -> dict[str, dict[str, str]]:
    """Each former name of a regularizer option (a field of RetrainSettings before the
    regularizers owned their options) -> {regularizer: its key}."""
    names: dict[str, dict[str, str]] = {}
    for name in REGULARIZERS:
        for field in dataclasses.fields(REGULARIZERS.get(name).settings_class):
            if field.metadata.get("old_name"):
                names.setdefault(field.metadata["old_name"], {})[name] = field.name
    return names


#: Former names of the regularizers' options, accepted for one release with a warning.
OLD_NAMES = _old_names()


def resolve(spec: str) -> RegularizerSettings:
    """The settings of the regularizer named in ``spec``: its options from the spec, the rest
    at their defaults. An unknown name, or a key it does not take (the message lists the keys
    it takes), is a :class:`RegistryError`; a bad value a ``SettingsError``."""
    name, rest = split_spec(spec)
    cls = REGULARIZERS.get(name).settings_class
    given = parse_options(rest) if rest else {}
    keys = [field.name for field in dataclasses.fields(cls)]
    unknown = [key for key in given if key not in keys]
    if unknown:
        raise RegistryError(
            f"regularizer {name!r} has no option {unknown[0]!r} "
            f"(options: {', '.join(keys) or 'none'})"
        )
    return cls.from_dict(given, where=f"regularizer {spec!r}")


def create(spec: str) -> Regularizer:
    """The regularizer named in ``spec`` with its settings (see :func:`resolve`)."""
    settings = resolve(spec)
    return REGULARIZERS.get(settings.regularizer)(settings)


def spec_text(value: Any) -> str:
    """``value`` as a spec writes it: lists in brackets, booleans as true/false."""
    if isinstance(value, tuple | list):
        return json.dumps(list(value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def upgrade(
    spec: str,
    old: Mapping[str, Any],
    old_form: str = "{name}=",
    new_form: str = "regularizer='{spec}'",
) -> str:
    """``spec`` with the options ``old`` gives by their former names (:data:`OLD_NAMES`)
    added where the spec does not set them; each warns (:class:`OldSpelling`) with its new
    spelling. ``old_form`` spells a former name (``{name}``, ``{flag}``: ``--kl-weight``),
    ``new_form`` the new one (``{spec}``: ``kl:weight=0.3``, ``{regularizer}``, ``{option}``:
    ``weight=0.3``). A former name the regularizer does not take is ignored, as it was."""
    name, rest = split_spec(spec)
    cls = REGULARIZERS.get(name).settings_class
    given = parse_options(rest) if rest else {}
    added = [rest] if rest else []
    for old_name, value in old.items():
        if value is None:  # the regularizer's own default, as it was
            continue
        said = old_form.format(name=old_name, flag="--" + old_name.replace("_", "-"))
        key = OLD_NAMES[old_name].get(name)
        if key is None:
            warnings.warn(
                f"{said} is deprecated and ignored: {name} does not take it",
                OldSpelling,
                stacklevel=3,
            )
            continue
        option = f"{key}={spec_text(cls.coerce(key, value))}"
        new = new_form.format(spec=f"{name}:{option}", regularizer=name, option=option)
        warnings.warn(f"{said} is deprecated; use {new}", OldSpelling, stacklevel=3)
        if key not in given:
            added.append(option)
    return f"{name}:{','.join(added)}" if added else name


def help_rows() -> list[tuple[str, str]]:
    """One row per regularizer option, ``NAME:key`` and its help with the default."""
    rows = []
    for name in REGULARIZERS:
        for field in dataclasses.fields(REGULARIZERS.get(name).settings_class):
            default = field.metadata.get("default_text") or spec_text(field.default)
            rows.append((f"{name}:{field.name}", f"{field.metadata['help']} [default: {default}]"))
    return rows


__all__ = [
    "OLD_NAMES",
    "REGULARIZERS",
    "DERSettings",
    "EMASettings",
    "EpochKLSettings",
    "AdaptiveKLSettings",
    "InterleaveSettings",
    "KLSettings",
    "L2Settings",
    "LDIFSSettings",
    "Regularizer",
    "RegularizerSettings",
    "RegistryError",
    "Run",
    "SFTSettings",
    "create",
    "help_rows",
    "resolve",
    "spec_text",
    "upgrade",
]
