"""The methods ``compare`` runs, named as the capabilities name them.

A spec is ``FAMILY`` or ``FAMILY:key=value,...``: ``recover:rate=0.005``, ``safe_lora:tau=0.35``,
``interpolate:alpha=0.5``, ``retrain:kl`` (a retrain spec's first bare word is its regularizer,
its keys retrain's settings and the regularizer's options: ``retrain:kl,weight=0.2,epochs=2``).
Each family calls its capability's own Python API, so a method's
output is what its own command gives for the same inputs and settings.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safealign.compare.settings import CompareInputs
from safealign.data import prompt_set
from safealign.merge import (
    METHODS,
    MergeSettings,
    parameter_problems,
    role_problem,
    run_merge,
    safety_config,
)
from safealign.recover import RecoverInputs, RecoverSettings, recover
from safealign.recover.safetylock import SafetyLockInputs, SafetyLockSettings, safetylock
from safealign.registry import (
    Registry,
    RegistryError,
    parse_options,
    parse_value,
    split_items,
    split_spec,
)
from safealign.retrain import RetrainInputs, RetrainSettings, retrain
from safealign.retrain.regularizers import OLD_NAMES, REGULARIZERS, resolve, spec_text, upgrade
from safealign.settings import Settings

#: What ``compare`` runs when no method is named (each is skipped if its inputs are missing).
DEFAULT_METHODS = (
    "recover",
    "safemerge",
    "safe_lora",
    "csulora",
    "safetylock",
    "resta",
    "interpolate",
    "retrain:sft",
    "retrain:kl",
    "retrain:adaptive-kl",
    "retrain:der",
)


@dataclass(frozen=True)
class MethodSpec:
    """One method to run: its family, the method within it, and its options."""

    spec: str
    family: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """A folder name for this method's output."""
        return re.sub(r"[^\w.]+", "-", self.spec.replace(":", "_", 1)).strip("-")


@dataclass(frozen=True)
class NoRepair:
    """A method that ran to its end but whose result failed (recover: no repair held), and
    why, in one line."""

    reason: str


@dataclass(frozen=True)
class Shortfall:
    """A method whose output was written but fails its own target (recover: the kept state is
    more harmful than A by over its margin), and why, in one line; the row is scored."""

    folder: Path
    reason: str


@dataclass(frozen=True)
class Family:
    """How to check and run the methods of one capability. ``check`` validates a spec against
    the capability's registry and settings (raising :class:`RegistryError` or
    ``SettingsError``) before any model is loaded; ``missing`` says which input a method
    lacks (it is then skipped); ``run`` calls the capability's API and returns the output
    folder, :class:`NoRepair` or :class:`Shortfall`."""

    check: Callable[[MethodSpec], None]
    missing: Callable[[MethodSpec, CompareInputs], str | None]
    run: Callable[[MethodSpec, CompareInputs, Path], Path | NoRepair | Shortfall]


FAMILIES: Registry[Family] = Registry("method family")


def parse_method(spec: str) -> MethodSpec:
    """Parse a spec; unknown methods and malformed options raise :class:`RegistryError`."""
    head, rest = split_spec(spec)
    family = head if head in ("recover", "retrain", "safetylock") else "merge"
    options: dict[str, Any] = {}
    method = head
    for item in split_items(rest):
        key, eq, value = item.partition("=")
        if not eq and family == "retrain" and method == "retrain":
            method = item
        elif not eq or not key.strip():
            raise RegistryError(f"method {spec!r}: option {item!r} is not key=value")
        else:
            options[key.strip()] = parse_value(value)
    if family == "retrain" and method == "retrain":
        raise RegistryError(f"method {spec!r}: name a regularizer, e.g. retrain:kl")
    parsed = MethodSpec(spec, family, method, options)
    FAMILIES.get(family).check(parsed)
    return parsed


def join_specs(items: tuple[str, ...] | list[str]) -> list[str]:
    """Glue a comma-split method list back into specs: a piece like ``weight=0.2`` (an
    option, no ``:`` before its ``=``) continues the spec before it."""
    specs: list[str] = []
    for item in items:
        key = item.split("=", 1)[0]
        if specs and "=" in item and ":" not in key:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def with_options(spec: MethodSpec, family: str, options: str) -> MethodSpec:
    """``spec`` with a family's shared ``options`` (``k=v,...``) under its own."""
    if spec.family != family or not options:
        return spec
    return dataclasses.replace(spec, options={**parse_options(options), **spec.options})


def _settings_options(cls: type[Settings], spec: MethodSpec, options: dict) -> Settings:
    """``cls`` built from a spec's ``options``: an unknown name or a bad value is refused,
    naming the spec."""
    return cls.from_dict(options, where=f"method {spec.spec!r}")


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


# -- recover


def _recover_missing(spec: MethodSpec, inputs: CompareInputs) -> str | None:
    if not inputs.given("harmful") and not inputs.given("harmful_train"):
        return "recover needs harmful prompts (--harmful)"
    return None


def _recover_run(spec: MethodSpec, inputs: CompareInputs, out: Path) -> Path | NoRepair | Shortfall:
    given = RecoverInputs(
        inputs.aligned,
        inputs.finetuned,
        # recover's own harmful rate (adaptive's stop rule) is on its direction prompts, never
        # on the set this comparison reports
        harmful=_first(inputs.harmful_train, inputs.harmful),
        task=_first(inputs.task_train, inputs.task),
        benign=_first(inputs.guard, inputs.benign_train),
    )
    settings = _settings_options(RecoverSettings, spec, {**spec.options, "overwrite": True})
    result = recover(given, settings, out)
    if result.failure:
        return NoRepair(result.failure)
    if result.shortfall:
        return Shortfall(Path(result.out), result.shortfall)
    return Path(result.out)


def _recover_check(spec: MethodSpec) -> None:
    _settings_options(RecoverSettings, spec, spec.options)


FAMILIES.register("recover")(Family(_recover_check, _recover_missing, _recover_run))


# -- safetylock


def _safetylock_missing(spec: MethodSpec, inputs: CompareInputs) -> str | None:
    if not inputs.given("harmful") and not inputs.given("harmful_train"):
        return "safetylock needs harmful prompts (--harmful)"
    if (
        spec.options.get("contrast") == "prompts"
        and _first(inputs.benign_train, inputs.benign) is None
    ):
        return "safetylock:contrast=prompts needs benign prompts (--benign)"
    return None


def _safetylock_run(spec: MethodSpec, inputs: CompareInputs, out: Path) -> Path:
    """SafetyLock with the training prompts (the direction's harmful prompts, the guard's
    benign ones), never the scored sets."""
    given = SafetyLockInputs(
        inputs.aligned,
        inputs.finetuned,
        harmful=_first(inputs.harmful_train, inputs.harmful),
        benign=_first(inputs.benign_train, inputs.benign),
    )
    settings = _settings_options(SafetyLockSettings, spec, {**spec.options, "overwrite": True})
    return Path(safetylock(given, settings, out).out)


def _safetylock_check(spec: MethodSpec) -> None:
    _settings_options(SafetyLockSettings, spec, spec.options)


FAMILIES.register("safetylock")(Family(_safetylock_check, _safetylock_missing, _safetylock_run))


# -- merge


def _safety_merges() -> list[str]:
    """Merge methods that repair a fine-tuned model (those with a ``finetuned`` role)."""
    return [name for name in METHODS.names() if "finetuned" in METHODS.get(name).required_roles]


def _merge_missing(spec: MethodSpec, inputs: CompareInputs) -> str | None:
    cls = METHODS.get(spec.method)
    takes = cls.required_roles + cls.optional_roles
    return role_problem(spec.method, {r for r in takes if getattr(inputs, r, None) is not None})


def safety_merge_config(method: str, inputs: CompareInputs, parameters: dict | None = None):
    """The merge config of safety method ``method`` on ``inputs``, each role it takes filled."""
    cls = METHODS.get(method)
    roles = {
        role: getattr(inputs, role, None)
        for role in cls.required_roles + cls.optional_roles
        if role != "finetuned"
    }
    return safety_config(
        method,
        aligned=inputs.aligned,
        finetuned=inputs.finetuned,
        parameters=parameters or None,
        **roles,
    )


def _merge_run(spec: MethodSpec, inputs: CompareInputs, out: Path) -> Path:
    config = safety_merge_config(spec.method, inputs, spec.options)
    return Path(run_merge(config, MergeSettings(overwrite=True), out).out)


def _merge_check(spec: MethodSpec) -> None:
    if spec.method not in _safety_merges():
        raise RegistryError(
            f"unknown method {spec.spec!r}: choose recover, safetylock, retrain:REGULARIZER or "
            f"one of {', '.join(_safety_merges())}"
        )
    problems = parameter_problems(spec.method, spec.options)
    if problems:
        raise RegistryError(f"method {spec.spec!r}: {problems[0]}")


FAMILIES.register("merge")(Family(_merge_check, _merge_missing, _merge_run))


# -- retrain


def _retrain_missing(spec: MethodSpec, inputs: CompareInputs) -> str | None:
    if not inputs.given("train_data"):
        return "retrain needs the fine-tuning data (--train-data)"
    return None


def _prompts(value: Any, role: str) -> list[str]:
    """The prompts of a set given as a file, a list of prompts or of task examples (none: [])."""
    return [] if value is None else prompt_set(value, role).prompts


def _prompt_file(prompts: list[str], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def retrain_options(spec: MethodSpec) -> dict[str, Any]:
    """retrain's keywords for a ``retrain:REG,key=value,...`` spec: its settings as they are,
    the regularizer's options in its spec (``regularizer="kl:weight=0.2"``); an option under
    its former name (``kl_weight``) warns, naming the new spelling."""
    settings = {f.name for f in dataclasses.fields(RetrainSettings)} | set(RetrainSettings.RENAMED)
    keys = [f.name for f in dataclasses.fields(REGULARIZERS.get(spec.method).settings_class)]
    own, old, options = [], {}, {}
    for key, value in spec.options.items():
        if key in settings:
            options[key] = value
        elif key in keys:
            own.append(f"{key}={spec_text(value)}")
        elif key in OLD_NAMES:
            old[key] = value
        else:
            raise RegistryError(
                f"method {spec.spec!r}: {key!r} is neither a retrain setting nor a "
                f"{spec.method} option ({', '.join(keys) or 'it takes none'})"
            )
    regularizer = upgrade(
        spec.method + (":" + ",".join(own) if own else ""),
        old,
        old_form="{name}",
        new_form="retrain:{regularizer},{option}",
    )
    return {"regularizer": regularizer, **options}


def interleave_spec(regularizer: str, finetuned: str | Path) -> str:
    """An interleave spec with B (``finetuned``) as its misaligned model, unless it names one."""
    if resolve(regularizer).misaligned:
        return regularizer
    name, rest = split_spec(regularizer)
    return f"{name}:{rest + ',' if rest else ''}misaligned={finetuned}"


def _retrain_run(spec: MethodSpec, inputs: CompareInputs, out: Path) -> Path:
    """retrain on the fine-tuning data. Its critic and anchors learn from the training sets:
    harmful prompts, and as benign the benign prompts plus the task's training prompts (a
    critic must learn that task requests are safe); they are written beside the output.
    retrain drops those that are prompts of the fine-tuning data (on the lab: every task
    training prompt, and the harmful ones the fine-tune answers);
    interleave scores its anchors with B as the misaligned model (unless its spec names one),
    and its default pool is A's replies to the benign prompts alone: A's answers to the task's
    prompts are the ones the fine-tune must unlearn."""
    sets = out.parent / f"{out.name}.inputs"
    harmful = _prompts(_first(inputs.harmful_train, inputs.harmful), "harmful")
    benign = _prompts(_first(inputs.benign_train, inputs.benign), "benign")
    if spec.method != "interleave":
        benign += _prompts(inputs.task_train, "task_train")
    given = RetrainInputs(
        str(inputs.aligned),
        str(inputs.train_data),
        harmful=_prompt_file(harmful, sets / "harmful.jsonl"),
        benign=_prompt_file(benign, sets / "benign.jsonl"),
    )
    options = {**retrain_options(spec), "overwrite": True}
    if spec.method == "interleave":
        options["regularizer"] = interleave_spec(options["regularizer"], inputs.finetuned)
    result = retrain(given, _settings_options(RetrainSettings, spec, options), out)
    return Path(result.out)


def _retrain_check(spec: MethodSpec) -> None:
    settings = _settings_options(RetrainSettings, spec, retrain_options(spec))
    resolve(settings.regularizer)  # the regularizer's options and their values


FAMILIES.register("retrain")(Family(_retrain_check, _retrain_missing, _retrain_run))
