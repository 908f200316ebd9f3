"""safealign.compare: every method side by side on the user's models, one evaluator for all,
the Pareto front and a recommendation."""

from safealign.compare.methods import DEFAULT_METHODS, MethodSpec, parse_method
from safealign.compare.report import pareto_names, plot_tradeoff
from safealign.compare.result import CompareResult, MethodRow
from safealign.compare.run import compare
from safealign.compare.settings import CompareInputs, CompareSettings

__all__ = [
    "DEFAULT_METHODS",
    "CompareInputs",
    "CompareResult",
    "CompareSettings",
    "MethodRow",
    "MethodSpec",
    "compare",
    "pareto_names",
    "parse_method",
    "plot_tradeoff",
]
