"""One settings object per command: defaults, help and range checks written once.

A command's settings are a dataclass deriving from :class:`Settings` whose fields are made
with :func:`setting`, each named as its flag. The CLI options are generated from it
(:func:`click_options`), the capability's entry point takes it, YAML configs load into it
(:meth:`Settings.from_dict`, unknown keys refused) and reports and model cards record
:meth:`Settings.to_dict`. A new option is added in one place.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import click
import yaml

from safealign.command import VOCABULARY, OldSpelling, Option, shared_help
from safealign.registry import split_items

S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """A setting out of range or unknown; the message names the CLI flag."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: Sequence[str] | None = None,
    path: bool = False,
    default_text: str | None = None,
    group: str | None = None,
    cli: bool = True,
    old_name: str | None = None,
) -> Any:
    """A settings field. ``min``/``max`` bound numbers (``*_open``: the bound itself is out),
    ``choices`` bounds text, ``path`` marks a file or folder argument, ``default_text`` is
    what help shows for a ``None`` default, ``cli=False`` keeps the field off the CLI;
    ``group`` starts a help section that the fields after it stay in (until the next);
    ``old_name`` is a former spelling, still accepted for one release with a warning."""
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "min_open": min_open,
        "max_open": max_open,
        "choices": tuple(choices) if choices else None,
        "path": path,
        "default_text": default_text,
        "group": group,
        "cli": cli,
        "old_name": old_name,
    }
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple (immutable) default for a sequence setting")
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field) -> str:
    """The CLI flag of a field: ``--`` and its name with dashes (``grad_batch_size`` is
    ``--grad-batch-size``): a field is named as its flag, in the API, YAML and specs alike."""
    return "--" + field.name.replace("_", "-")


def _bounds_text(meta: Mapping) -> str:
    low, high = meta["min"], meta["max"]
    if low is not None and high is not None:
        left = "(" if meta["min_open"] else "["
        right = ")" if meta["max_open"] else "]"
        return f"in {left}{low}, {high}{right}"
    if low is not None:
        return f"{'>' if meta['min_open'] else '>='} {low}"
    return f"{'<' if meta['max_open'] else '<='} {high}"


def _out_of_bounds(value: float, meta: Mapping) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return True
    low, high = meta["min"], meta["max"]
    if low is not None and (value <= low if meta["min_open"] else value < low):
        return True
    return high is not None and (value >= high if meta["max_open"] else value > high)


def _check_field(field: dataclasses.Field, value: Any, label: str) -> str | None:
    meta = field.metadata
    if value is None:
        return None
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if meta.get("choices") and item not in meta["choices"]:
            return f"{label} must be one of {', '.join(meta['choices'])}, got {item!r}"
        bounded = meta.get("min") is not None or meta.get("max") is not None
        if bounded and isinstance(item, int | float) and not isinstance(item, bool):
            if _out_of_bounds(item, meta):
                return f"{label} must be {_bounds_text(meta)}, got {item}"
    return None


@dataclasses.dataclass
class Settings:
    """Base of every command's settings; checks every field on construction."""

    #: Former field names (old: new), still accepted by :meth:`from_dict` and :meth:`replace`
    #: for one release with an :class:`~safealign.command.OldSpelling` warning.
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`SettingsError` for the first field out of range."""
        for field in dataclasses.fields(self):
            problem = _check_field(field, getattr(self, field.name), self.spelled(field))
            if problem:
                raise SettingsError(problem)

    @classmethod
    def spelled(cls, field: dataclasses.Field) -> str:
        """How messages name ``field``: its CLI flag."""
        return flag_name(field)

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """``value`` as field ``name`` holds it (a list or ``"a,b"`` text as a tuple, an int as a
        float); a value of the wrong type is refused naming the key."""
        return _coerce(value, cls, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as text, tuples as lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any], where: str = "settings") -> S:
        """Build from a mapping (a YAML config); unknown keys are refused, listing the known."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in data.items():
            name = cls.current_name(str(key).replace("-", "_"), where)
            if name not in known:
                raise SettingsError(
                    f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}"
                )
            values[name] = cls.coerce(name, value)
        return cls(**values)

    @classmethod
    def current_name(cls, name: str, where: str = "settings") -> str:
        """``name``, or the field it was renamed to (saying so with an OldSpelling warning)."""
        new = cls.RENAMED.get(name)
        if new is None:
            return name
        warnings.warn(f"{where}: {name} is now {new}", OldSpelling, stacklevel=3)
        return new

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied (and checked)."""
        changes = {self.current_name(key): value for key, value in changes.items()}
        return dataclasses.replace(self, **changes)


def read_config(path: str | Path) -> dict[str, Any]:
    """A command's YAML config: a mapping, read with ``safe_load``, keys with ``-`` written
    ``_``; anything else is a :class:`SettingsError` naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise SettingsError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)``."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), True
    return hint, False


def _coerce(value: Any, cls: type, name: str) -> Any:
    """YAML lists (or one item) become tuples for tuple-typed fields, ints floats for float
    ones; a value of the wrong type (a list for a number, text for a flag) is refused naming
    the key."""
    base, _ = _base_type(_hints(cls)[name])
    if typing.get_origin(base) is tuple and isinstance(value, list | tuple):
        value = tuple(value)
    elif typing.get_origin(base) is tuple and isinstance(value, str):
        value = _split_list(value, typing.get_args(base)[0])
    elif typing.get_origin(base) is tuple and value is not None:
        value = (value,)
    if value is not None and not _has_type(value, base):
        raise SettingsError(f"{name}: expected {_type_name(base)}, got {value!r}")
    return _floats(value, base)


def _floats(value: Any, hint: Any) -> Any:
    """Ints of a float field (or of a tuple of floats) as floats."""
    if isinstance(value, tuple) and typing.get_origin(hint) is tuple:
        return tuple(_floats(v, typing.get_args(hint)[0]) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (ints fit floats, text fits paths, bools fit neither)."""
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple) and all(
            _has_type(v, typing.get_args(hint)[0]) for v in value
        )
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Path:
        return isinstance(value, str | Path)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint)).replace("str", "text")


def _split_list(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in split_items(text))
    except ValueError:
        raise SettingsError(f"expected a comma-separated list, got {text!r}") from None


def _list_callback(kind: type, default: Any) -> Callable:
    def convert(_ctx, param, value):
        if value is None:
            return default  # an empty tuple default shows no default text
        if isinstance(value, tuple):
            return value
        try:
            return _split_list(value, kind)
        except SettingsError as error:
            raise click.BadParameter(str(error), param=param) from None

    return convert


def _option(field: dataclasses.Field, hint: Any, group: str) -> Callable:
    meta = field.metadata
    base, _ = _base_type(hint)
    flag = flag_name(field)
    help_text = shared_help(flag, meta["help"]) if flag in VOCABULARY else meta["help"]
    kwargs: dict[str, Any] = {"help": help_text, "show_default": True, "cls": Option}
    if flag not in VOCABULARY:
        kwargs["group"] = group
    if field.default is None:
        kwargs["show_default"] = meta.get("default_text") or False
    if base is bool:
        if field.default is True:
            return click.option(f"{flag}/--no-{flag[2:]}", field.name, default=True, **kwargs)
        return click.option(flag, field.name, is_flag=True, default=False, **kwargs)
    kwargs["default"] = field.default
    if typing.get_origin(base) is tuple:
        kind = typing.get_args(base)[0]
        kwargs["callback"] = _list_callback(kind, field.default)
        kwargs["default"] = ",".join(map(str, field.default)) if field.default else None
        kwargs["metavar"] = "X,Y,..."
    elif meta.get("choices"):
        kwargs["type"] = click.Choice(meta["choices"])
    elif meta.get("path"):
        kwargs["type"] = click.Path()
    elif base in (int, float, str):
        kwargs["type"] = base
    return click.option(flag, field.name, **kwargs)


def click_options(
    cls: type[Settings], exclude: Sequence[str] = (), group: str = "Options"
) -> Callable:
    """Decorator adding one click option per CLI field of ``cls`` (in field order); fields
    before the first that names a ``group`` go in help section ``group``."""
    hints = _hints(cls)
    fields = [
        f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude
    ]

    groups = []
    for field in fields:
        group = field.metadata.get("group") or group
        groups.append(group)

    def decorate(command: Callable) -> Callable:
        for field, group in reversed(list(zip(fields, groups, strict=True))):
            command = _option(field, hints[field.name], group)(command)
        return command

    return decorate


def from_cli(
    cls: type[S], values: dict[str, Any], base: Mapping[str, Any] | None = None
) -> tuple[S, dict[str, Any]]:
    """Split click's keyword values into ``(settings, the rest)``.

    With ``base`` (a loaded YAML config), a flag left at its default does not override the
    config's value: flags the user typed win, then the config, then the defaults.
    """
    ctx = click.get_current_context(silent=True)
    names = {f.name for f in dataclasses.fields(cls)}
    merged = dict(base or {})
    rest = {}
    for key, value in values.items():
        if key not in names:
            rest[key] = value
            continue
        typed = ctx is None or ctx.get_parameter_source(key) not in (
            click.core.ParameterSource.DEFAULT,
            click.core.ParameterSource.DEFAULT_MAP,
        )
        if typed or key not in merged:
            merged[key] = value
    return cls.from_dict(merged), rest
