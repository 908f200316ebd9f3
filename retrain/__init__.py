"""safealign.retrain: fine-tuning that keeps alignment (regularizers on an accelerate loop)."""

from safealign.retrain.api import RetrainResult, retrain
from safealign.retrain.durability import SFTFineTuner
from safealign.retrain.regularizers import REGULARIZERS
from safealign.retrain.settings import RetrainInputs, RetrainSettings

__all__ = [
    "REGULARIZERS",
    "RetrainInputs",
    "RetrainResult",
    "RetrainSettings",
    "SFTFineTuner",
    "retrain",
]
