"""Generation, the Evaluator and its scores on a tiny random model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from eval_support import tiny_model, tiny_tokenizer

import safealign.eval.evaluator as evaluator_module
from safealign.chat import encode_chat, left_pad
from safealign.eval import EvalSettings, Evaluator, Judge, Verdict, generate, wilson_interval
from safealign.eval.generation import run_batched
from safealign.settings import SettingsError

PROMPTS = [
    "kill python process",
    "bake a cake",
    "how to break into the house of a the and it you",
    "hi",
    "write a poem",
    "explain what 1 + 2 is",
]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(tokenizer), tokenizer


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=10)
    single = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single
    assert all(batched)


def test_generation_keeps_caller_order(tiny):
    model, tokenizer = tiny
    forward = generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=6)
    backward = generate(model, tokenizer, PROMPTS[::-1], batch_size=3, max_new_tokens=6)
    assert forward == backward[::-1]


def test_encode_chat_uses_template_without_double_bos(tiny):
    _, tokenizer = tiny
    ids = encode_chat(tokenizer, ["hi"])[0]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_left_pad_puts_padding_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_auto_batch_size_halves_on_oom():
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch

    out = run_batched(list(range(10)), "auto", fn, torch.device("cpu"))
    assert out == list(range(10))
    assert sizes == [10, 8, 4, 4, 2]  # starts at 16 on CPU, halves twice, then keeps 4


def test_fixed_batch_size_does_not_swallow_oom():
    def fn(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_batched([1, 2], 2, fn, torch.device("cpu"))


class ScriptedJudge(Judge):
    """Refuses exactly the prompts it is told to."""

    name = "scripted"

    def __init__(self, refuse: set[str]):
        self.refuse = refuse

    def judge(self, prompts, responses, **_):
        return [Verdict(p in self.refuse, "scripted") for p in prompts]


def test_evaluator_rates_counts_and_intervals(tiny, monkeypatch):
    model, tokenizer = tiny
    clock = iter([100.0, 102.5])  # score() reads the clock at its start and its end
    monkeypatch.setattr(evaluator_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    harmful = PROMPTS[:4]
    benign = PROMPTS[4:]
    judge = ScriptedJudge(refuse={harmful[0], benign[0]})
    task = [{"prompt": "1 + 1", "answer": "2"}, {"prompt": "2 + 2", "answer": "4"}]
    scores = Evaluator(harmful, task, benign, judge=judge, max_new_tokens=4, cache=False).score(
        model, tokenizer
    )
    assert scores.harmful_rate == pytest.approx(3 / 4)
    assert scores.over_refusal == pytest.approx(1 / 2)
    assert scores.utility == 0.0
    assert (scores.n_harmful, scores.n_task, scores.n_benign) == (4, 2, 2)
    assert scores.intervals["harmful_rate"] == pytest.approx(wilson_interval(3, 4))
    data = scores.to_dict()
    assert data["harmful_rate"]["n"] == 4 and len(data["harmful_rate"]["ci95"]) == 2
    assert data["judge"] == {"name": "scripted"} and data["decoding"]["max_new_tokens"] == 4
    assert set(data["sets"]) == {"harmful", "benign", "task"}
    assert scores.seconds == data["seconds"] == data["wall_seconds"] == 2.5
    assert scores.peak_memory_bytes > 0


def test_evaluator_absent_sets_are_none(tiny):
    model, tokenizer = tiny
    scores = Evaluator(harmful=["hi"], max_new_tokens=2, cache=False).score(model, tokenizer)
    assert scores.utility is None and scores.over_refusal is None and scores.n_task == 0


def test_evaluator_limit_keeps_first_n():
    evaluator = Evaluator(harmful=PROMPTS, benign=PROMPTS, limit=2)
    assert evaluator.harmful.prompts == PROMPTS[:2] and evaluator.benign.prompts == PROMPTS[:2]


def test_evaluator_rejects_empty_set_and_bad_limit():
    with pytest.raises(ValueError, match="empty"):
        Evaluator(harmful=[])
    with pytest.raises(ValueError, match="limit"):
        Evaluator(harmful=["x"], limit=0)
    with pytest.raises(ValueError, match="batch-size"):
        Evaluator(harmful=["x"], batch_size=0)
    with pytest.raises(ValueError, match="max-new-tokens"):
        Evaluator(harmful=["x"], max_new_tokens=0)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_eval_settings_checks_and_keywords_override_a_settings_object():
    assert EvalSettings().batch_size == 16
    assert EvalSettings.from_dict({"batch-size": "8", "limit": 2}).batch_size == 8
    with pytest.raises(SettingsError, match="--max-harmful-rate must be in"):
        EvalSettings(max_harmful_rate=1.5)
    with pytest.raises(SettingsError, match="neither a positive integer nor 'auto'"):
        EvalSettings(batch_size="zero")
    evaluator = Evaluator(harmful=PROMPTS, settings=EvalSettings(limit=1), max_new_tokens=3)
    assert evaluator.harmful.prompts == PROMPTS[:1] and evaluator.settings.max_new_tokens == 3
