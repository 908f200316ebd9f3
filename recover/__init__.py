"""safealign.recover: restore a fine-tuned model's safety by resetting a few weights to aligned
values, chosen by the gradient of the harmful direction, with rollback when utility drops."""

from safealign.recover.api import RecoverInputs, recover
from safealign.recover.plan import Plan
from safealign.recover.result import RecoveryResult, RunOutcome, StepRecord
from safealign.recover.settings import RecoverSettings

__all__ = [
    "Plan",
    "RecoverInputs",
    "RecoverSettings",
    "RecoveryResult",
    "RunOutcome",
    "StepRecord",
    "recover",
]
