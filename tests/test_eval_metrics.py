"""Every metric against hand-computed values, and its failure paths."""

from __future__ import annotations

import math

import pytest
import torch
from eval_support import scripted_model, tiny_model, tiny_tokenizer

from safealign.chat import encode_chat
from safealign.eval import METRICS, get_metric
from safealign.eval.metrics import choice_index, lcs_length, rouge_l_f1
from safealign.eval.sets import Example


def ex(prompt, answer=None, choices=None):
    return Example(prompt, answer, choices)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_registry_and_options():
    assert {"exact_match", "contains", "rouge_l", "multiple_choice", "perplexity"} <= set(METRICS)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="not key=value"):
        get_metric("exact_match:lowercase")
    with pytest.raises(ValueError, match="metric 'rouge_l:colour=red'"):
        get_metric("rouge_l:colour=red")


def test_exact_match_normalisation_options():
    examples = [ex("q", "Paris"), ex("q", "42"), ex("q", "new  york"), ex("q", ["4", "four"])]
    responses = [" paris. ", "42!", "New York", "Four"]
    assert get_metric("exact_match").score(examples, responses) == [1.0, 1.0, 1.0, 1.0]
    strict = get_metric("exact_match:lowercase=false,punctuation=false,whitespace=false")
    assert strict.score(examples, responses) == [0.0, 0.0, 0.0, 0.0]
    assert strict.score([ex("q", "Paris")], [" Paris "]) == [1.0]  # strip stays on
    no_strip = get_metric("exact_match", strip=False, whitespace=False)
    assert no_strip.score([ex("q", "Paris")], [" Paris "]) == [0.0]


def test_contains_metric():
    metric = get_metric("contains")
    examples = [ex("q", "42"), ex("q", "42"), ex("q", "Blue Whale")]
    responses = ["The answer is 42.", "The answer is 41.", "the blue whale is largest"]
    assert metric.score(examples, responses) == [1.0, 0.0, 1.0]


def test_text_metrics_need_answers_and_responses():
    with pytest.raises(ValueError, match="no answer"):
        get_metric("exact_match").score([ex("q")], ["x"])
    with pytest.raises(ValueError, match="one response per example"):
        get_metric("contains").score([ex("q", "a")], None)


def test_rouge_l_hand_computed():
    assert lcs_length("a b c d".split(), "b d e".split()) == 2
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d": precision 2/4, recall 2/3, F1 = 2PR/(P+R) = 4/7
    assert rouge_l_f1("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l_f1("x y", "a b") == 0.0
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("a", "") == 0.0
    metric = get_metric("rouge_l")
    assert metric.binary is False
    assert metric.score([ex("q", "B D E")], ["a, b c d"]) == [pytest.approx(4 / 7)]


def test_choice_index_accepts_index_letter_and_text():
    choices = ["red", "green", "blue"]
    assert choice_index(ex("q", 2, choices), 3) == 2
    assert choice_index(ex("q", "1", choices), 3) == 1
    assert choice_index(ex("q", "b", choices), 3) == 1
    assert choice_index(ex("q", "blue", choices), 3) == 2
    with pytest.raises(ValueError, match="out of range"):
        choice_index(ex("q", "D", choices), 3)
    with pytest.raises(ValueError, match="no index, letter or choice"):
        choice_index(ex("q", "purple", choices), 3)


def test_multiple_choice_on_a_scripted_model(tokenizer):
    model = scripted_model(tokenizer, {"<|assistant|>": "yes"}, "ok")
    metric = get_metric("multiple_choice")
    examples = [
        ex("hi", "A", ["yes", "no"]),
        ex("hi", "B", ["yes", "no"]),
        ex("hi", 1, ["no", "yes"]),
    ]
    assert metric.score(examples, None, model=model, tokenizer=tokenizer) == [1.0, 0.0, 1.0]


def test_multiple_choice_matches_manual_log_likelihood(tokenizer):
    model = tiny_model(tokenizer, seed=2)
    choices = ["bake a cake", "yes", "kill python process now"]
    context = encode_chat(tokenizer, ["what ?"])[0]
    totals = []
    for choice in choices:
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0]
        totals.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
    best = max(range(3), key=totals.__getitem__)
    examples = [ex("what ?", i, choices) for i in range(3)]
    got = get_metric("multiple_choice").score(examples, None, model=model, tokenizer=tokenizer)
    assert got == [float(i == best) for i in range(3)]
    normalised = get_metric("multiple_choice:length_normalise=true")
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    per_token = [total / n for total, n in zip(totals, lengths, strict=True)]
    best_norm = max(range(3), key=per_token.__getitem__)
    got = normalised.score(examples, None, model=model, tokenizer=tokenizer, batch_size=2)
    assert got == [float(i == best_norm) for i in range(3)]


def test_multiple_choice_errors(tokenizer):
    model = tiny_model(tokenizer)
    metric = get_metric("multiple_choice")
    with pytest.raises(ValueError, match="has no choices"):
        metric.score([ex("hi", "A")], None, model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs the model"):
        metric.score([ex("hi", "A", ["a", "b"])], None)


def test_perplexity_matches_model_loss(tokenizer):
    model = tiny_model(tokenizer, seed=4)
    metric = get_metric("perplexity")
    assert metric.binary is False and metric.needs_answer is False
    text = "bake a cake then write a poem"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        plain = math.exp(-float(model(ids, labels=ids).loss))
    prompt, answer = "explain what 1 + 2 is", "3"
    ctx = tokenizer(prompt)["input_ids"]
    full = torch.tensor([tokenizer(prompt + " " + answer)["input_ids"]])
    labels = full.clone()
    labels[0, : len(ctx)] = -100
    with torch.no_grad():
        answered = math.exp(-float(model(full, labels=labels).loss))
    examples = [ex(text), ex(prompt, " " + answer), ex("hi there")]
    got = metric.score(examples, None, model=model, tokenizer=tokenizer, batch_size=2)
    assert got[0] == pytest.approx(plain, rel=1e-4)
    assert got[1] == pytest.approx(answered, rel=1e-4)
    assert all(0 < v <= 1 for v in got)
    one_by_one = metric.score(examples, None, model=model, tokenizer=tokenizer, batch_size=1)
    assert got == pytest.approx(one_by_one, rel=1e-5)


def test_perplexity_errors(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(ValueError, match="under two tokens"):
        get_metric("perplexity").score([ex("hi")], None, model=model, tokenizer=tokenizer)
