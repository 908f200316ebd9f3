"""The regularizers registry: ``NAME`` or ``NAME:key=value,...``, defaults from the settings."""

from __future__ import annotations

from safealign.registry import Registry, RegistryError, parse_options, split_spec
from safealign.retrain.regularizers.adaptive import AdaptiveKL
from safealign.retrain.regularizers.base import Regularizer, Run
from safealign.retrain.regularizers.divergence import KL, LDIFS, SFT, EpochKL
from safealign.retrain.regularizers.interleave import Interleave
from safealign.retrain.regularizers.replay import DER
from safealign.retrain.regularizers.weights import EMA, L2

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")
for _name, _cls in (
    ("sft", SFT),
    ("kl", KL),
    ("epoch-kl", EpochKL),
    ("adaptive-kl", AdaptiveKL),
    ("der", DER),
    ("l2", L2),
    ("ema", EMA),
    ("ldifs", LDIFS),
    ("interleave", Interleave),
):
    REGULARIZERS.register(_name)(_cls)


def create(spec: str, settings) -> Regularizer:
    """The regularizer named in ``spec``: options from the spec, else from ``settings``.

    An option the regularizer does not take is refused, naming those it takes."""
    name, rest = split_spec(spec)
    cls = REGULARIZERS.get(name)
    given = parse_options(rest) if rest else {}
    unknown = sorted(set(given) - set(cls.options) - set(cls.spec_options))
    if unknown:
        known = ", ".join([*cls.options, *cls.spec_options]) or "none"
        raise RegistryError(f"regularizer {name!r} has no option {unknown[0]!r} (options: {known})")
    values = {key: getattr(settings, field) for key, field in cls.options.items()}
    try:
        return cls(**(values | given))
    except (TypeError, ValueError) as error:
        raise RegistryError(f"regularizer {spec!r}: {error}") from None


__all__ = ["REGULARIZERS", "Regularizer", "RegistryError", "Run", "create"]
