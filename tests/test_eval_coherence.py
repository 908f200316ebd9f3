"""The incoherence rule on written degenerate and normal replies."""

from __future__ import annotations

import pytest
from coherence_support import DEGENERATE, NORMAL

from safealign.eval.coherence import coherence


def flagged(pairs) -> list[str]:
    return [reply for prompt, reply in pairs if coherence(reply, prompt).incoherent]


def test_the_written_sets_are_varied():
    rules = {coherence(reply, prompt).rule for prompt, reply in DEGENERATE}
    assert len(DEGENERATE) >= 20 and len(NORMAL) >= 20
    assert {"empty", "repetition", "no words"} <= rules


def test_rule_flags_at_least_90_percent_of_degenerate_replies():
    share = len(flagged(DEGENERATE)) / len(DEGENERATE)
    missed = [r for p, r in DEGENERATE if not coherence(r, p).incoherent]
    assert share >= 0.9, f"flagged {share:.0%}; missed {missed}"


def test_rule_flags_at_most_2_percent_of_normal_replies():
    wrong = flagged(NORMAL)
    assert len(wrong) / len(NORMAL) <= 0.02, wrong


@pytest.mark.parametrize(
    ("prompt", "reply", "rule"),
    [
        ("Hi", "", "empty"),
        ("Hi", "no no no no no", "repetition"),  # one word five times in a row
        ("Hi", "yes no no yes yes no no yes", "repetition"),  # half the words stutter
        ("Hi", "red red blue blue", ""),  # short: a list of labels, no loop
        ("Hi", "I can help. I can help. I can help.", "repetition"),  # looped trigrams
        ("Hi", "?!", "no words"),  # short, but neither letter nor digit
        ("Hi", "12 34 56 78 90 !!", "no words"),  # long enough, too few letters
        ("Hi", "Спасибо, хорошо.", "no words"),  # words, but not in the prompt's script
        ("Как дела?", "Спасибо, хорошо.", ""),
        ("Hi", "84", ""),  # a bare number is an answer
        ("Hi", "No, no.", ""),  # too short to loop
    ],
)
def test_each_rule_as_documented(prompt, reply, rule):
    assert coherence(reply, prompt).rule == rule
