"""``recover --utility drift``: without labelled task data, a step holds while its drift from B
on the checked benign prompts stays within the bound."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from recover_support import HARMFUL, TASK_PROMPTS, make_pair, run_recover

from safealign.checkpoint import Checkpoint
from safealign.eval.drift import drift
from safealign.recover import RecoverSettings
from safealign.recover.cli import recover_command
from safealign.recover.settings import DRIFT_MAX
from safealign.recover.weights import load_working_model
from safealign.settings import SettingsError

BENIGN = [*TASK_PROMPTS, "write a poem", "what is the sum of two and three"]
BOUND = 0.047


def test_steps_hold_while_drift_is_within_the_bound(tmp_path):
    aligned, finetuned = make_pair(tmp_path, noise=0.05)
    result = run_recover(
        aligned,
        finetuned,
        tmp_path / "out",
        harmful=HARMFUL,
        benign=BENIGN,
        utility=f"drift:max={BOUND}",
        schedule="guarded",
        rate=0.005,
        steps=4,
        max_new_tokens=6,
        harmful_margin=1.0,
    )
    scores = result.scores
    assert scores["finetuned"]["drift"] == 0.0 and scores["aligned"]["drift"] > BOUND
    checked = [s for s in result.run.steps if s.holds is not None]
    assert checked and all(s.drift is not None for s in checked)
    # over-refusal is checked too, against its own ceiling
    ceiling = max(scores["aligned"]["over_refusal"], scores["finetuned"]["over_refusal"]) + 0.05
    assert all(s.holds == (s.drift <= BOUND and s.over_refusal <= ceiling) for s in checked)
    # a step whose drift broke the bound was rolled back (guarded rolls back only on a failure)
    assert any(s.rolled_back for s in checked), "the bound never bit: the test proves nothing"
    # the written model's drift from B on the checked half is the kept step's
    half = BENIGN[len(BENIGN) // 2 :]
    assert result.sets["benign"]["n"] == len(half)
    b, tokenizer = load_working_model(
        Checkpoint.open(aligned), Checkpoint.open(finetuned), torch.float32, None
    )
    c, _ = load_working_model(
        Checkpoint.open(aligned), Checkpoint.open(result.out), torch.float32, None
    )
    measured = drift(b, c, tokenizer, half, batch_size=16).mean
    if result.run.kept_step:
        assert measured == pytest.approx(result.run.drift, abs=1e-6) and measured <= BOUND
    report = json.loads((result.out / "report.json").read_text())
    assert report["settings"]["utility"] == f"drift:max={BOUND}"


def test_drift_needs_benign_prompts_and_a_well_formed_bound(tmp_path):
    assert RecoverSettings(utility="drift").drift_max == DRIFT_MAX
    assert RecoverSettings().drift_max is None
    for bad in ("drift:max=0", "drift:max=x", "drift:limit=1", "loss"):
        with pytest.raises(SettingsError, match="--utility"):
            RecoverSettings(utility=bad)
    missing = str(tmp_path / "missing")
    args = ["--aligned", missing, "--finetuned", missing, "--out", str(tmp_path / "o")]
    bad = CliRunner().invoke(recover_command, [*args, "--utility", "drift:max=0"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "--utility" in bad.output
    aligned, finetuned = make_pair(tmp_path)
    args = ["--aligned", str(aligned), "--finetuned", str(finetuned), "--out", str(tmp_path / "o")]
    no_benign = CliRunner().invoke(recover_command, [*args, "--utility", "drift", "--quiet"])
    assert no_benign.exit_code == 2
    assert no_benign.output.splitlines()[-1] == (
        "Error: --utility drift needs benign prompts (--benign): drift is measured on them"
    )
    assert not (tmp_path / "o").exists()
