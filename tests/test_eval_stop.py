"""Stopping generation once a judge's verdict is decided: ``Judge.decided`` is exact for the
text judges, stopped generation gives the verdicts full generation gives from fewer forward
passes, a judge that never decides generates as before, and recover's output is unchanged."""

from __future__ import annotations

import json
import random

import pytest
import torch
from eval_support import scripted_model, word_tokenizer
from recover_support import HARMFUL, TASK_PROMPTS, make_pair, run_recover
from safetensors.torch import load_file
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

import safealign.eval.generation as generation
import safealign.recover.guard as guard
from safealign.eval import Evaluator, Judge, Verdict, generate, get_judge
from safealign.eval.generation import StopWhenDecided, rewrites_decoded_text
from safealign.eval.judges import REFUSAL_OPENINGS, REFUSAL_SUBSTRINGS, KeywordPrefixJudge

#: The chat template is the prompt alone, so a scripted model's first reply token follows the
#: prompt's last word.
PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
CHAINS = {  # a scripted model's next token after each token (else "ok")
    "early": "I",  # "I cannot help help ...": keyword decides at token 2
    "I": "cannot",
    "cannot": "help",
    "help": "help",
    "late": "Sure",  # "Sure here is how to make it I cannot ...": keyword decides at token 9
    "Sure": "here",
    "here": "is",
    "is": "how",
    "how": "to",
    "to": "make",
    "make": "it",
    "it": "I",
    "never": "ok",  # "ok ok ...": never a refusal
    "ends": "no",  # "no" then EOS
    "no": "</s>",
    "sorry": "Sorry",  # "Sorry" then EOS
    "Sorry": "</s>",
    ".": "I",  # "ask early ." as "ask early"
}
WORDS = [*CHAINS, *CHAINS.values(), "ok", "ask", "a", ".", "b"]
PROMPTS = ["ask early", "ask late", "ask never", "ask ends", "ask sorry", "ask early ."]
MAX_NEW = 24


@pytest.fixture(scope="module")
def scripted():
    tokenizer = word_tokenizer([w for w in WORDS if w != "</s>"], chat_template=PLAIN)
    return scripted_model(tokenizer, CHAINS, "ok"), tokenizer


def forwards(model, run) -> tuple[object, int]:
    """``run()``'s result and how many forward passes of ``model`` it made."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


def texts(rng: random.Random, pieces: list[str], n: int) -> list[str]:
    """``n`` random texts of up to 5 pieces."""
    return ["".join(rng.choices(pieces, k=rng.randint(0, 5))) for _ in range(n)]


@pytest.mark.parametrize("name", ["keyword", "keyword-prefix"])
def test_decided_means_every_continuation_gets_the_same_verdict(name):
    judge = get_judge(name)
    rng = random.Random(0)
    fragments = [*REFUSAL_SUBSTRINGS, *REFUSAL_OPENINGS, *(s[:3] for s in REFUSAL_OPENINGS)]
    pieces = [*fragments, " ", "\n", '"', "*", "'", "\u2019", "Here", "x", "Sure", "I", ","]
    partials = texts(rng, pieces, 400)
    endings = texts(rng, pieces, 60)
    n_decided = 0
    for partial in partials:
        verdict = judge.judge(["p"], [partial])[0].refused
        if judge.decided("p", partial):
            n_decided += 1
            later = judge.judge(["p"] * len(endings), [partial + e for e in endings])
            assert all(v.refused == verdict for v in later), partial
        else:  # undecided: some continuation refuses (the rest of an opening) and some complies
            rests = [o[k:] for o in ("Sorry", *REFUSAL_OPENINGS) for k in range(len(o))]
            later = judge.judge(["p"] * len(rests), [partial + rest for rest in rests])
            assert any(v.refused for v in later), partial
            assert not judge.judge(["p"], [partial + "zz"])[0].refused, partial
    assert 50 < n_decided < len(partials)


def test_keyword_prefix_decides_at_the_opening():
    judge = get_judge("keyword-prefix")
    assert not judge.decided("p", "")
    assert not judge.decided("p", ' "*I')  # "I'm sorry", "I cannot", ... may follow
    assert judge.decided("p", ' "*I cannot')  # refused, whatever follows
    assert judge.decided("p", "Here")  # no opening starts with "h": complied
    assert not judge.decided("p", "I will")  # "I will not" may follow
    assert judge.decided("p", "I will do")  # no opening starts so: complied
    assert not get_judge("keyword").decided("p", "Here is how")


def test_keyword_prefix_waits_at_a_capital_sigma():
    """``str.lower`` lowers a final capital sigma to ς and any other to σ: what follows it
    decides, so the start is undecided there."""
    judge = KeywordPrefixJudge(openings=("ας",))
    assert not judge.decided("p", "ΑΣ")
    assert [v.refused for v in judge.judge(["p", "p"], ["ΑΣ", "ΑΣΑ"])] == [True, False]
    assert judge.decided("p", "Β")


def test_judges_without_substrings_or_openings_are_decided_at_once():
    """Their verdict is always "complied"."""
    assert get_judge("keyword", substrings=()).decided("p", "")
    assert get_judge("keyword-prefix", openings=()).decided("p", "")


def byte_level() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that knows ASCII words: other characters are split into bytes."""
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(["I am sorry, ok."] * 3, vocab_size=270, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer)


def test_decoded_prefixes_are_prefixes_of_the_full_text():
    """What stopping relies on: the decoded reply so far, trailing U+FFFD removed, is a prefix of
    the longer reply's text, for a byte-level BPE tokenizer on multi-byte text; a tokenizer that
    cleans up tokenization spaces is told apart."""
    text = "I\u2019m sorry \u2014 na\u00efve \u65e5\u672c\u8a9e caf\u00e9 \U0001f600 ok."
    tokenizer = byte_level()
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    assert full == text
    partials = [tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in partials)  # incomplete last characters do occur
    assert all(full.startswith(p.rstrip("\ufffd")) for p in partials)
    assert not rewrites_decoded_text(tokenizer)
    words = word_tokenizer(["a", ".", "b"])
    assert not rewrites_decoded_text(words)
    words.clean_up_tokenization_spaces = True
    assert rewrites_decoded_text(words)


@pytest.mark.parametrize(
    "name, text",
    [
        ("keyword-prefix", "\u2019I\u2019m sorry, no."),  # the quote's first byte alone: U+FFFD
        ("keyword-prefix", "\u201cSure, ok."),
        ("keyword", "\u65e5 I can\u2019t, sorry."),
    ],
)
def test_a_row_stops_where_its_verdict_is_that_of_the_whole_reply(name, text):
    """Token by token through a byte-level tokenizer, a reply stops at the first prefix whose
    text decides the judge, and that text gets the whole reply's verdict."""
    tokenizer, judge = byte_level(), get_judge(name)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    verdict = judge.judge(["p"], [text])[0].refused
    for n in range(1, ids.shape[1] + 1):
        criterion = StopWhenDecided(tokenizer, [0], 0, lambda _, reply: judge.decided("p", reply))
        if criterion(ids[:, :n], None).item():
            break
    assert n < ids.shape[1]
    stopped = tokenizer.decode(ids[0, :n]).strip()
    assert judge.judge(["p"], [stopped])[0].refused == verdict


@pytest.mark.parametrize("name", ["keyword", "keyword-prefix"])
@pytest.mark.parametrize("batch_size", [2, 6])
def test_stopped_replies_get_the_verdicts_of_full_ones(scripted, name, batch_size):
    model, tokenizer = scripted
    judge = get_judge(name)
    options = {"batch_size": batch_size, "max_new_tokens": MAX_NEW}
    full, n_full = forwards(model, lambda: generate(model, tokenizer, PROMPTS, **options))
    stopped, n_stopped = forwards(
        model, lambda: generate(model, tokenizer, PROMPTS, decided=judge.decided, **options)
    )
    assert full[0].startswith("I cannot help help") and "I cannot" in full[1][12:]
    assert [v.refused for v in judge.judge(PROMPTS, stopped)] == [
        v.refused for v in judge.judge(PROMPTS, full)
    ]
    assert all(f.startswith(s) for f, s in zip(full, stopped, strict=True))
    assert stopped != full and n_stopped <= n_full
    if name == "keyword":  # "ask never" runs to the end; the rest stop at their refusal or EOS
        assert stopped[0] == "I cannot" and stopped[1].endswith("it I cannot")
        assert stopped[2] == full[2] and stopped[3] == "no"


def test_a_batch_stops_when_every_row_is_decided_or_ended(scripted):
    model, tokenizer = scripted
    prompts = ["ask early", "ask sorry", "ask ends"]  # decided at 2, 1; EOS at 2
    judge = get_judge("keyword")
    run = lambda **kw: generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, **kw)  # noqa: E731
    _, n_full = forwards(model, run)
    stopped, n_stopped = forwards(model, lambda: run(decided=judge.decided))
    assert (n_full, n_stopped) == (MAX_NEW, 2)
    assert stopped == ["I cannot", "Sorry", "no"]
    tokenizer.clean_up_tokenization_spaces = True  # decoding may rewrite text: never stops
    try:
        assert forwards(model, lambda: run(decided=judge.decided))[1] == MAX_NEW
    finally:
        tokenizer.clean_up_tokenization_spaces = False


class LengthJudge(Judge):
    """Refused when the reply has under 20 characters; never decides early."""

    name = "length"

    def judge(self, prompts, responses, **_):
        return [Verdict(len(r) < 20) for r in responses]


def test_a_judge_that_never_decides_generates_as_before(scripted):
    model, tokenizer = scripted
    run = lambda **kw: generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, **kw)  # noqa: E731
    full, n_full = forwards(model, run)
    assert not LengthJudge().decides_early and get_judge("keyword").decides_early
    assert forwards(model, lambda: run(decided=LengthJudge().decided)) == (full, n_full)
    scores = {}
    for stop in (False, True):
        evaluator = Evaluator(PROMPTS, judge=LengthJudge(), stop_when_decided=stop, **OPTIONS)
        scores[stop], n = forwards(model, lambda e=evaluator: e.score(model, tokenizer))
        assert n == n_full
    assert scores[True].samples == scores[False].samples
    assert scores[True].config["decoding"] == scores[False].config["decoding"]


OPTIONS = {"max_new_tokens": MAX_NEW, "cache": False, "batch_size": 6}


def test_the_evaluator_stops_only_harmful_replies_that_nothing_else_reads(scripted):
    model, tokenizer = scripted
    benign = ["ask early ."]  # also a harmful prompt: its reply is read in full
    full = Evaluator(PROMPTS, benign=benign, **OPTIONS).score(model, tokenizer)
    stopping = Evaluator(PROMPTS, benign=benign, stop_when_decided=True, **OPTIONS)
    stopped = stopping.score(model, tokenizer)
    assert stopped.harmful_rate == full.harmful_rate == 2 / 6
    assert stopped.over_refusal == full.over_refusal == 1.0
    replies = {(s["set"], s["prompt"]): s["response"] for s in stopped.samples}
    assert replies["harmful", "ask early"] == "I cannot"
    assert replies["harmful", "ask early ."] == replies["benign", "ask early ."]
    assert replies["benign", "ask early ."].startswith("I cannot help help help")
    assert full.safe_and_coherent_rate is not None and stopped.safe_and_coherent_rate is None
    assert "harmful" in full.incoherent_rate and "harmful" not in stopped.incoherent_rate
    assert stopped.config["decoding"]["stop_when_decided_by"] == {"name": "keyword"}
    assert "stop_when_decided_by" not in full.config["decoding"]


def test_recover_output_is_the_same_with_and_without_stopping(tmp_path, monkeypatch):
    """Only the harmful rate of A, B and the kept state is scored with stopping, and its value
    is the same: the written tensors and report's scores are bit-identical."""
    aligned, finetuned = make_pair(tmp_path)
    task = [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
    common = {"harmful": HARMFUL, "task": task, "rate": 0.01, "steps": 2, "max_new_tokens": 12}
    common |= {"schedule": "paper", "judge": "keyword-prefix"}
    stops = []
    real_call = generation.StopWhenDecided.__call__

    def counting(self, input_ids, scores, **kwargs):
        done = real_call(self, input_ids, scores, **kwargs)
        stops.append(int(done.sum()))
        return done

    monkeypatch.setattr(generation.StopWhenDecided, "__call__", counting)
    stopped = run_recover(aligned, finetuned, tmp_path / "stopped", **common)
    assert sum(stops) > 0  # replies were cut
    evaluator = guard.Evaluator
    monkeypatch.setattr(
        guard, "Evaluator", lambda *a, **kw: evaluator(*a, **{**kw, "stop_when_decided": False})
    )
    stops.clear()
    full = run_recover(aligned, finetuned, tmp_path / "full", **common)
    assert stops == []
    assert stopped.run.kept_step == full.run.kept_step > 0
    assert stopped.scores == full.scores
    a = load_file(tmp_path / "stopped" / "model.safetensors")
    b = load_file(tmp_path / "full" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("stopped", "full")]
    assert reports[0]["scores"] == reports[1]["scores"]
