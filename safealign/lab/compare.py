"""The lab as inputs of ``compare``: its models and data in the roles each method takes, and
the evaluator every lab figure (demo, tests, benchmarks) is scored with."""

from __future__ import annotations

from safealign.compare import CompareInputs
from safealign.data import load_prompts, load_task
from safealign.eval import Evaluator
from safealign.lab.guard import guard_prompts
from safealign.lab.layout import Lab

#: Harmful training prompts that define recover's harmful direction.
DIRECTION_PROMPTS = 128
#: Task examples recover rolls back with (the first half) and checks utility on (the second):
#: a slice of the fine-tune's task data, kept apart from ``task_eval``, on which every model
#: is scored.
CHECK_EXAMPLES = 128
#: Benign look-alike prompts (from the safety data, apart from ``benign_eval``) the methods
#: learn from (retrain's critic and anchors, safetylock's contrast).
BENIGN_TRAIN_PROMPTS = 64
#: The evaluator's generation batch on the lab (its prompts are short).
BATCH_SIZE = 64
#: The lab's LoRA fine-tune schedule (how ft_harmful_lora was trained), given to every
#: retrain method so that ``retrain:sft`` reproduces the loss of alignment.
RETRAIN_OPTIONS = "epochs=3,grad_batch_size=16,lr=0.003"


def lab_inputs(lab: Lab, finetuned: str = "ft_harmful_lora") -> CompareInputs:
    """The lab's aligned model, fine-tune ``finetuned``, the roles and data every method takes.

    RESTA's harmful model is ``ft_harmful_only``, fully fine-tuned as in the paper, whatever
    the kind of ``finetuned``: on the lab the LoRA one (``ft_harmful_only_lora``) gives a
    safety vector that restores no refusal (``benchmarks/bench_safety_merge.py``).
    """
    return CompareInputs(
        aligned=lab.aligned,
        finetuned=lab.model(finetuned),
        unaligned=lab.unaligned,
        safety=lab.safety_lora,
        harmful_model=lab.ft_harmful_only,
        train_data=lab.data("ft_harmful_train"),
        harmful=lab.data("harmful_eval"),
        task=lab.data("task_eval"),
        benign=lab.data("benign_eval"),
        harmful_train=load_prompts(lab.data("harmful_train")).prompts[:DIRECTION_PROMPTS],
        task_train=load_task(lab.data("task_train")).examples[:CHECK_EXAMPLES],
        benign_train=lab.prompts("safety_train", kind="lookalike")[:BENIGN_TRAIN_PROMPTS],
        # recover's over-refusal guard: without one, restoring ends with 95% over-refusal on
        # the default lab's LoRA fine-tune (see safealign.lab.guard for why these prompts)
        guard=guard_prompts(lab),
    )


def lab_evaluator(lab: Lab, **settings) -> Evaluator:
    """The shared evaluator on the lab's held-out sets (compare's defaults, lab batch size;
    ``settings`` override them, e.g. ``max_new_tokens=24, cache=False``, or the sets:
    ``harmful=[...]``)."""
    defaults = {
        "harmful": lab.data("harmful_eval"),
        "task": lab.data("task_eval"),
        "benign": lab.data("benign_eval"),
        "judge": "keyword",
        "metric": "exact_match",
        "batch_size": BATCH_SIZE,
    }
    return Evaluator(**(defaults | settings))
