"""Benign prompts for recover's over-refusal guard on the lab: drawn as ``benign_eval`` is,
never one of its prompts (or of any lab data set).

The guard's prompts stand for the benign prompts over-refusal is scored on. Look-alikes from
``safety_train`` do not: they are built from the goals and templates the aligned model was
trained to answer, and on the default lab a repair that kept them answered still refused 19% of
``benign_eval`` (``benchmarks/bench_recover_guard.py``). The real-model lab has a benign
validation split (``benign_val``: ordinary requests and look-alikes held out from alignment
and evaluation); the tiny labs draw theirs from the corpus's generators, every look-alike and
general goal in the templates held out from training, as ``benign_eval``'s held-out requests
are. Drawn at feed time, not a lab file, so the labs' build keys stay as they are.
"""

from __future__ import annotations

import itertools
import random

from safealign.lab.corpus import BENIGN_TOPICS, EVAL_TEMPLATES, LOOKALIKES, requests
from safealign.lab.layout import DATASETS, Lab

#: Benign prompts the guard is fed: the first half steers recover's rollback, the other half
#: is checked.
GUARD_PROMPTS = 64


def guard_prompts(lab: Lab, n: int = GUARD_PROMPTS) -> list[str]:
    """``n`` benign prompts for recover's guard: the real-model lab's first ``n`` of
    ``benign_val``; on a tiny lab, half look-alikes and half general requests in the held-out
    templates, none a prompt of the lab's data, shuffled with the lab's seed."""
    if lab.data("benign_val").exists():
        return lab.prompts("benign_val")[:n]
    seen = {prompt for name in DATASETS for prompt in lab.prompts(name)}
    rng = random.Random(f"benign-guard-{lab.info.get('seed', 0)}")
    picked: list[str] = []
    for kind, groups in (("lookalike", LOOKALIKES), ("general", BENIGN_TOPICS.values())):
        goals = _goals(groups, kind)
        pool = requests(goals, EVAL_TEMPLATES, rng, len(goals) * len(EVAL_TEMPLATES))
        half = n // 2 if kind == "lookalike" else n - n // 2
        picked += [prompt for _, _, prompt in pool if prompt not in seen][:half]
    rng.shuffle(picked)
    return picked


def _goals(groups, kind: str) -> list[tuple[str, str]]:
    """Every verb-object goal of ``groups`` as (kind, goal)."""
    return [
        (kind, f"{verb} {obj}")
        for verbs, objects in groups
        for verb, obj in itertools.product(verbs, objects)
    ]
