"""safealign.eval: the shared evaluator (harmful rate, utility, over-refusal) and its parts."""

from safealign.eval.api import EvalInputs, evaluate
from safealign.eval.cache import ResponseCache, folder_fingerprint
from safealign.eval.drift import Drift, DriftReference
from safealign.eval.evaluator import Evaluator
from safealign.eval.generation import generate
from safealign.eval.harm_judges import ClassifierJudge, GuardJudge, HarmBenchJudge
from safealign.eval.judges import JUDGES, Judge, JudgeError, Verdict, get_judge, register_judge
from safealign.eval.metrics import METRICS, Metric, get_metric, register_metric
from safealign.eval.results import Scores, wilson_interval, write_results
from safealign.eval.settings import EvalSettings

__all__ = [
    "JUDGES",
    "METRICS",
    "ClassifierJudge",
    "Drift",
    "DriftReference",
    "EvalInputs",
    "EvalSettings",
    "Evaluator",
    "GuardJudge",
    "HarmBenchJudge",
    "Judge",
    "JudgeError",
    "Metric",
    "ResponseCache",
    "Scores",
    "Verdict",
    "evaluate",
    "folder_fingerprint",
    "generate",
    "get_judge",
    "get_metric",
    "register_judge",
    "register_metric",
    "wilson_interval",
    "write_results",
]
