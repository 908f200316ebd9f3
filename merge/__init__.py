"""Merging: mergekit-format configs, a streaming engine, and safety-aware layer-wise methods.

Python API::

    from safealign.merge import run_merge, load_config
    result = run_merge("merge.yaml", MergeSettings(), "out/merged")  # or a dict / MergeConfig
    config = safety_config("safemerge", aligned=A, unaligned=U, finetuned=B)
    result = run_merge(config, MergeSettings(seed=1, output_type="model"), "out/C", print)
"""

from safealign.merge.config import MergeConfig, MergeConfigError, load_config, parameter_problems
from safealign.merge.engine import MergeResult, return_freed_tensors_to_os, run_merge, score_layers
from safealign.merge.methods import METHODS
from safealign.merge.plan import plan_merge
from safealign.merge.report import layer_table
from safealign.merge.settings import MergeSettings
from safealign.merge.shortcuts import role_problem, safety_config

__all__ = [
    "METHODS",
    "MergeConfig",
    "MergeConfigError",
    "MergeResult",
    "MergeSettings",
    "layer_table",
    "load_config",
    "parameter_problems",
    "plan_merge",
    "return_freed_tensors_to_os",
    "role_problem",
    "run_merge",
    "safety_config",
    "score_layers",
]
