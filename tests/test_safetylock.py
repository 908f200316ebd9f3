"""SafetyLock: the probes, the lock, and the baked checkpoint against the runtime shift."""

from __future__ import annotations

import json

import pytest
import torch
from recover_support import HARMFUL, make_adapter, make_pair
from transformers import AutoModelForCausalLM

from safealign.checkpoint import Checkpoint, CheckpointError
from safealign.recover.heads import (
    build_lock,
    fit_probes,
    probe_accuracy,
    shifted,
)
from safealign.recover.safetylock import (
    REPORT_NAME,
    AlignedModel,
    SafetyLockInputs,
    SafetyLockSettings,
    contrast_samples,
    lock_from_samples,
    safetylock,
)
from safealign.settings import SettingsError


def test_probes_minimise_the_regularised_logistic_loss():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 5)
    y = (x[0, :, 0] + 0.3 * torch.randn(40) > 0).long()
    w, b = fit_probes(x, y)
    sign = y.double() * 2 - 1

    def loss(w, b):
        logits = torch.einsum("psd,pd->ps", x.double(), w) + b[:, None]
        return torch.nn.functional.softplus(-sign * logits).sum(1) + 0.5 * (w**2).sum(1)

    w_ = w.clone().requires_grad_(True)
    b_ = b.clone().requires_grad_(True)
    loss(w_, b_).sum().backward()
    assert w_.grad.abs().max() < 1e-4 and b_.grad.abs().max() < 1e-4  # a stationary point
    assert probe_accuracy(x, y, w, b)[0] > 0.85  # the informative probe separates


def test_the_lock_takes_the_separating_heads_and_their_mass_mean_directions():
    torch.manual_seed(1)
    samples, layers, heads, dim = 60, 2, 3, 4
    labels = torch.tensor([1, 0] * (samples // 2))
    acts = torch.randn(samples, layers, heads * dim)
    signal = torch.tensor([2.0, 0.0, 0.0, 0.0])
    acts[labels == 1, 1, dim : 2 * dim] += signal  # layer 1, head 1 separates
    lock = build_lock(acts, labels, heads, top=1, seed=0)
    assert lock.chosen == ((1, 1),)
    per_head = acts[:, 1, dim : 2 * dim]
    expected = per_head[labels == 1].mean(0) - per_head[labels == 0].mean(0)
    expected = expected / expected.norm()
    torch.testing.assert_close(lock.directions[1, 1], expected)
    assert lock.directions[0].abs().sum() == 0 and lock.spreads[0].abs().sum() == 0
    spread = (per_head @ expected).std(unbiased=False)
    shift = lock.displacement(6.0)
    torch.testing.assert_close(shift[1, dim : 2 * dim], 6.0 * spread * expected)
    assert shift[1, :dim].abs().sum() == 0


def _write_pairs(path, prompts):
    rows = [
        {
            "question": p,
            "answer_matching_behavior": "sorry cannot help",
            "answer_not_matching_behavior": "sure here are steps 1 2 3",
        }
        for p in prompts
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("adapter", [False, True])
def test_the_baked_checkpoint_equals_the_shifted_model(tmp_path, adapter):
    aligned, finetuned = make_pair(tmp_path)
    if adapter:
        finetuned = make_adapter(tmp_path, aligned)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", HARMFUL)
    settings = SafetyLockSettings(heads=3, strength=4.0, positions=2)
    inputs = SafetyLockInputs(aligned, finetuned, pairs=pairs)
    result = safetylock(inputs, settings, tmp_path / "locked")

    report = json.loads((result.out / REPORT_NAME).read_text())
    assert len(report["lock"]["heads"]) == 3
    locked = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    assert locked.config.attention_bias is True
    # the runtime form: B with its o_proj inputs shifted by the same lock
    b = Checkpoint.open(finetuned, base=Checkpoint.open(aligned) if adapter else None)
    reference = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    reference.load_state_dict({n: b.get(n) for n in b.names()}, strict=False)
    model_a = AlignedModel(Checkpoint.open(aligned), None)
    samples = contrast_samples(inputs, settings, model_a, b, print)
    lock = lock_from_samples(model_a, samples, settings)
    ids = torch.randint(0, locked.config.vocab_size, (3, 9))
    with torch.no_grad(), shifted(reference, lock.displacement(4.0)):
        expected = reference(ids).logits
    with torch.no_grad():
        got = locked(ids).logits
        plain = reference(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the lock changed something


def test_a_strength_of_zero_writes_the_fine_tuned_model(tmp_path):
    aligned, finetuned = make_pair(tmp_path)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", HARMFUL)
    settings = SafetyLockSettings(heads=2, strength=0.0, positions=2)
    result = safetylock(SafetyLockInputs(aligned, finetuned, pairs=pairs), settings, tmp_path / "o")
    locked = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)
    ids = torch.randint(0, plain.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(locked(ids).logits, plain(ids).logits)


def test_an_adapter_of_another_base_is_refused_before_work(tmp_path):
    aligned, _ = make_pair(tmp_path / "one")
    other, _ = make_pair(tmp_path / "two", seed=5, hidden_size=48)
    adapter = make_adapter(tmp_path / "two", other)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", HARMFUL)
    with pytest.raises(CheckpointError):
        safetylock(SafetyLockInputs(aligned, adapter, pairs=pairs), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_pairs_or_prompts_it_says_what_is_missing(tmp_path):
    aligned, finetuned = make_pair(tmp_path)
    with pytest.raises(SettingsError, match="--pairs"):
        safetylock(SafetyLockInputs(aligned, finetuned), None, tmp_path / "out")


def test_the_prompt_contrast_reads_harmful_and_benign_prompts(tmp_path):
    aligned, finetuned = make_pair(tmp_path)
    settings = SafetyLockSettings(heads=2, contrast="prompts", positions=3)
    benign = ["write poem", "sum of two and three", "what is 7 + 2"]
    inputs = SafetyLockInputs(aligned, finetuned, harmful=HARMFUL, benign=benign)
    result = safetylock(inputs, settings, tmp_path / "out")
    samples = result.report["samples"]
    assert (samples["contrast"], samples["toward"], samples["away"]) == ("prompts", 6, 3)
    assert len(result.report["lock"]["heads"]) == 2
    with pytest.raises(SettingsError, match="--benign"):
        safetylock(SafetyLockInputs(aligned, finetuned, harmful=HARMFUL), settings, None)


def _cli(*args):
    from click.testing import CliRunner

    from safealign.recover.lock_cli import safetylock_command

    return CliRunner().invoke(safetylock_command, [str(a) for a in args])


def test_the_cli_refuses_bad_input_in_one_line_before_work(tmp_path):
    aligned, finetuned = make_pair(tmp_path / "one")
    other, _ = make_pair(tmp_path / "two", seed=5, hidden_size=48)
    adapter = make_adapter(tmp_path / "two", other)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    cases = [
        ("--finetuned", adapter, "--harmful", harmful),
        ("--finetuned", finetuned, "--harmful", harmful, "--contrast", "prompts"),
        ("--finetuned", finetuned, "--harmful", harmful, "--heads", 0),
    ]
    for case in cases:
        result = _cli("--aligned", aligned, *case, "--out", tmp_path / "out", "--quiet")
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "out").exists()


def test_the_cli_dry_run_names_the_heads_and_writes_nothing(tmp_path):
    aligned, finetuned = make_pair(tmp_path)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", HARMFUL)
    args = ("--aligned", aligned, "--finetuned", finetuned, "--pairs", pairs, "--heads", 2)
    result = _cli(*args, "--positions", 2, "--dry-run", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["lock"]["heads"]) == 2
    assert report["samples"] == {
        "contrast": "replies",
        "source": str(pairs),
        "toward": 6,
        "away": 6,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "finetuned", "pairs.jsonl"]
