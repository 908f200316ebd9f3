"""retrain's ``sft`` as eval's durability fine-tuner (:mod:`safealign.eval.durability`),
registered when ``safealign.retrain`` is imported: eval imports no other capability, so the
capability that trains offers its fine-tune to it."""

from __future__ import annotations

from pathlib import Path

from safealign.eval.durability import FINE_TUNER, FINE_TUNERS, FineTuned, FineTuneJob
from safealign.model import load_model
from safealign.progress import ProgressCallback
from safealign.registry import parse_options
from safealign.retrain.api import retrain
from safealign.retrain.settings import RetrainInputs, RetrainSettings
from safealign.settings import SettingsError

#: What durability decides itself; its options may set any other retrain setting.
FIXED = ("regularizer", "max_steps", "seed", "full", "merge", "dry_run", "resume", "overwrite")


def durability_settings(options: str, steps: int, seed: int) -> RetrainSettings:
    """retrain's settings for a durability fine-tune: ``sft`` on a fresh LoRA for exactly
    ``steps`` steps, seeded, with ``options`` (``key=value,...``) over retrain's defaults."""
    given = parse_options(options) if options else {}
    fixed = [key for key in given if key in FIXED]
    if fixed:
        raise SettingsError(
            f"--durability-options: {fixed[0]} is set by durability itself "
            f"(fixed: {', '.join(FIXED)})"
        )
    given |= {"regularizer": "sft", "max_steps": steps, "seed": seed}
    return RetrainSettings.from_dict(given, where="--durability-options")


@FINE_TUNERS.register(FINE_TUNER)
class SFTFineTuner:
    """A fresh LoRA on the model, trained with retrain's ``sft`` for the job's steps. A model
    with an adapter is merged into a full copy first (in the job's folder), so the fine-tune
    starts from the model as scored, whatever its form."""

    def check(self, options: str) -> None:
        durability_settings(options, steps=1, seed=0)

    def __call__(self, job: FineTuneJob, progress: ProgressCallback = None) -> FineTuned:
        base = job.model if job.adapter is None else merged(job.model, job.adapter, job.out)
        settings = durability_settings(job.options, job.steps, job.seed)
        inputs = RetrainInputs(aligned=base, data=job.data)
        result = retrain(inputs, settings, job.out / "tuned", progress)
        return FineTuned(base, result.out)


def merged(model: Path, adapter: Path, out: Path) -> Path:
    """``model`` with ``adapter`` merged in, written to ``out/candidate`` (float32)."""
    loaded, tokenizer = load_model(model, adapter=adapter, dtype="float32")
    folder = out / "candidate"
    loaded.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
