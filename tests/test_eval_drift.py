"""Drift (eval/drift.py): KL(p_B ‖ p_candidate) over the first k positions of B's greedy
replies, checked against a hand computation on tiny Llama models, and its place in the
evaluator, results.json and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from eval_support import save_tiny, scripted_model, tiny_config, tiny_model, tiny_tokenizer
from transformers import LlamaForCausalLM

from safealign.chat import encode_chat
from safealign.eval import Evaluator
from safealign.eval.cli import eval_command
from safealign.eval.drift import DriftReference, drift
from safealign.eval.results import nonnegative_mean_interval

PROMPTS = ["write poem", "explain what 1 + 2 = ? Step first then make tool", "bake a cake"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _next_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token | ids) from one unpadded sequence, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def _hand_drift(reference, candidate, tokenizer, prompt: str, k: int) -> tuple[list, float]:
    """B's greedy reply token by token (argmax, stop after EOS or k tokens), then the mean over
    its positions of sum_v p_B(v) (log p_B(v) - log p_C(v)), each position one unpadded forward
    of prompt + reply so far."""
    ids = encode_chat(tokenizer, [prompt])[0]
    reply: list[int] = []
    kls = []
    while len(reply) < k:
        log_b = _next_logprobs(reference, ids + reply)
        log_c = _next_logprobs(candidate, ids + reply)
        kls.append(float((log_b.exp() * (log_b - log_c)).sum()))
        reply.append(int(log_b.argmax()))
        if reply[-1] == tokenizer.eos_token_id:
            break
    return reply, sum(kls) / len(kls)


def test_drift_equals_a_hand_computation_with_teacher_forcing_on_b_s_greedy_reply(tokenizer):
    reference, candidate = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    k = 5
    built = DriftReference.build(reference, tokenizer, PROMPTS, tokens=k, batch_size=2)
    result = built.score(candidate)
    for index, prompt in enumerate(PROMPTS):
        reply, value = _hand_drift(reference, candidate, tokenizer, prompt, k)
        assert built.replies[index] == reply
        assert result.positions[index] == len(reply)
        assert result.values[index] == pytest.approx(value, rel=1e-4)  # float32 vs 64
    assert result.mean == pytest.approx(sum(result.values) / len(PROMPTS))
    assert result.mean > 0
    # B's replies are not C's: the positions are B's teacher-forced reply, not C's own
    assert built.replies != DriftReference.build(candidate, tokenizer, PROMPTS, tokens=k).replies


def test_a_model_against_itself_drifts_zero(tokenizer):
    model = tiny_model(tokenizer, seed=0)
    result = drift(model, model, tokenizer, PROMPTS, tokens=6, batch_size=2)
    assert result.values == [0.0] * len(PROMPTS)
    assert result.mean == 0.0 and result.interval == (0.0, 0.0)


def _perturbed(model, scale: float):
    """``model`` with every weight moved by ``scale`` times one fixed random direction."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return moved


def test_drift_grows_with_the_perturbation(tokenizer):
    model = tiny_model(tokenizer, seed=0)
    reference = DriftReference.build(model, tokenizer, PROMPTS, tokens=8)
    small = reference.score(_perturbed(model, 0.01)).mean
    large = reference.score(_perturbed(model, 0.1)).mean
    assert 0 < small < large


def test_batched_equals_unbatched_and_replies_can_be_reused(tokenizer):
    reference, candidate = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=2)
    one = DriftReference.build(reference, tokenizer, PROMPTS, tokens=7, batch_size=1)
    batched = DriftReference.build(reference, tokenizer, PROMPTS, tokens=7, batch_size=3)
    assert one.replies == batched.replies
    assert len({len(ids) for ids in batched.prompt_ids}) == 3  # padding really happens
    for a, b in zip(one.logprobs, batched.logprobs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert one.score(candidate).values == pytest.approx(batched.score(candidate).values, abs=1e-6)
    again = DriftReference.build(
        candidate, tokenizer, PROMPTS, tokens=7, batch_size=3, replies=batched.replies
    )  # B's replies handed back: the candidate's log-probabilities on them
    assert again.replies == batched.replies
    assert again.score(candidate).values == [0.0] * len(PROMPTS)


def test_a_reply_ends_at_eos_and_an_empty_reply_is_scored_on_its_one_position(tokenizer):
    stops = scripted_model(tokenizer, {"<|assistant|>": "ok", "ok": "</s>"}, default="yes")
    silent = scripted_model(tokenizer, {"<|assistant|>": "</s>"}, default="yes")
    eos, ok = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("ok")
    short = DriftReference.build(stops, tokenizer, PROMPTS[:2], tokens=16)
    assert short.replies == [[ok, eos], [ok, eos]]
    empty = DriftReference.build(silent, tokenizer, PROMPTS[:2], tokens=16)
    assert empty.replies == [[eos], [eos]]
    result = empty.score(stops)
    assert result.positions == [1, 1] and result.mean > 1  # stops: says "ok" where B stops
    assert empty.score(silent).values == [0.0, 0.0]


def test_a_candidate_over_another_vocabulary_is_refused(tokenizer):
    model = tiny_model(tokenizer)
    other = LlamaForCausalLM(tiny_config(tokenizer, vocab_size=len(tokenizer) + 8)).eval()
    with pytest.raises(ValueError, match="another vocabulary"):
        DriftReference.build(model, tokenizer, PROMPTS, tokens=3).score(other)


def test_the_interval_is_a_normal_interval_floored_at_zero():
    low, high = nonnegative_mean_interval([0.1, 0.2, 0.3])
    half = 1.959963984540054 * 0.1 / 3**0.5
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half))
    assert nonnegative_mean_interval([0.0, 0.0, 3.0])[0] == 0.0
    assert nonnegative_mean_interval([0.5]) is None


def test_the_evaluator_reports_drift_with_n_and_interval(tokenizer, tmp_path):
    reference, candidate = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    evaluator = Evaluator(benign=PROMPTS, max_new_tokens=4, drift_tokens=5, cache=False)
    evaluator.drift_reference = evaluator.build_reference(reference, tokenizer, {"model": "B"})
    scores = evaluator.score(candidate, tokenizer)
    expected = drift(reference, candidate, tokenizer, PROMPTS, tokens=5)
    assert scores.drift == pytest.approx(expected.mean)
    entry = scores.to_dict()["drift"]
    assert entry["n"] == len(PROMPTS) and entry["value"] == scores.drift
    assert entry["ci95"] == pytest.approx(list(expected.interval))
    described = scores.to_dict()["drift_reference"]
    assert described == {"tokens": 5, "positions": 15, "model": "B"}
    benign = [s for s in scores.samples if s["set"] == "benign"]
    assert [s["drift"]["kl"] for s in benign] == pytest.approx(expected.values)
    assert "drift" in scores.summary() and "nats" in scores.summary()
    assert evaluator.score(reference, tokenizer).drift == 0.0
    assert Evaluator(benign=PROMPTS, cache=False).score(candidate, tokenizer).drift is None


def test_eval_cli_measures_drift_from_a_reference_folder(tmp_path):
    save_tiny(tmp_path / "b", seed=0)
    save_tiny(tmp_path / "c", seed=1)
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = ["--benign", str(benign), "--harmful", str(benign), "--max-new-tokens", "3"]
    base += ["--drift-tokens", "4", "--cache-dir", str(tmp_path / "cache"), "--json", "--quiet"]
    results = {}
    for model in ("b", "c"):
        args = ["--model", str(tmp_path / model), "--drift-reference", str(tmp_path / "b")]
        result = CliRunner().invoke(eval_command, [*args, *base])
        assert result.exit_code == 0, result.output
        results[model] = json.loads(result.output)
    assert results["b"]["drift"]["value"] == 0.0
    assert results["c"]["drift"]["value"] > 0 and results["c"]["drift"]["n"] == len(PROMPTS)
    reference = results["c"]["drift_reference"]
    assert reference["model"] == str(tmp_path / "b") and reference["tokens"] == 4
    refused = CliRunner().invoke(
        eval_command, ["--model", str(tmp_path / "c"), "--drift-reference-adapter", "x", *base]
    )
    assert refused.exit_code == 2 and "--drift-reference-adapter needs" in refused.output
