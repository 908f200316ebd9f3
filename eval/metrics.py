"""Utility metrics: score a model on a task set. A registry, looked up by name.

Each metric returns one score per example in [0, 1], higher is better; utility is their mean.

- ``exact_match``: normalised response equals a normalised answer.
- ``contains``: a normalised answer occurs in the normalised response.
- ``rouge_l``: ROUGE-L F1 between response and answer tokens (whitespace tokens, own LCS).
- ``multiple_choice``: the choice with the highest log-likelihood given the prompt is the
  answer (no generation). Examples need ``choices`` and an answer index or letter.
- ``perplexity``: per example exp(-mean token log-likelihood), i.e. 1 / perplexity, so higher
  is better; of the answer given the prompt when there is an answer, else of the prompt text.
"""

from __future__ import annotations

import math
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from safealign.chat import chat_prompt, encode_chat
from safealign.eval.likelihood import continuation_logprobs, split_continuation
from safealign.model import ensure_pad_token
from safealign.registry import Registry

Answer = str | Sequence[str]


@dataclass(frozen=True)
class Normaliser:
    """Text normalisation applied to both response and answer before comparison."""

    strip: bool = True
    lowercase: bool = True
    punctuation: bool = True
    whitespace: bool = True

    def __call__(self, text: str) -> str:
        if self.lowercase:
            text = text.lower()
        if self.punctuation:
            text = text.translate(PUNCTUATION_TABLE)
        if self.whitespace:
            text = " ".join(text.split())
        if self.strip:
            text = text.strip()
        return text


PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def answers_of(answer: Answer | None) -> list[str]:
    if answer is None:
        raise ValueError("task example has no answer")
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


class Metric(ABC):
    """Scores task examples; ``needs_response`` False means no generation is needed."""

    name: str = ""
    needs_response: bool = True
    #: False when examples may be plain text without an answer (perplexity).
    needs_answer: bool = True
    #: True when examples need a ``choices`` list (multiple choice).
    needs_choices: bool = False
    #: True when every per-example score is 0 or 1 (reported with a Wilson interval).
    binary: bool = True

    @abstractmethod
    def score(
        self,
        examples: Sequence,
        responses: Sequence[str] | None,
        *,
        model=None,
        tokenizer=None,
        batch_size: int | str = 16,
    ) -> list[float]:
        """One score per example."""

    def describe(self) -> dict:
        return {"name": self.name}


METRICS: Registry[type[Metric]] = Registry("metric")
#: Class decorator adding a metric to :data:`METRICS` under a name.
register_metric = METRICS.register


def get_metric(spec: str | Metric, **options) -> Metric:
    """A metric from a spec, e.g. ``"exact_match:lowercase=false"`` (an instance passes through)."""
    if isinstance(spec, Metric):
        return spec
    return METRICS.create(spec, **options)


class TextMetric(Metric):
    """A metric comparing each response with its answer(s); the best answer counts."""

    def __init__(self, **normalisation: bool):
        self.normalise = Normaliser(**normalisation)

    @abstractmethod
    def compare(self, response: str, answer: str) -> float:
        """Score of one normalised response against one normalised answer."""

    def score(self, examples, responses, **_) -> list[float]:
        if responses is None or len(responses) != len(examples):
            raise ValueError(f"{self.name}: needs one response per example")
        scores = []
        for example, response in zip(examples, responses, strict=True):
            got = self.normalise(response)
            scores.append(
                max(self.compare(got, self.normalise(a)) for a in answers_of(example.answer))
            )
        return scores

    def describe(self) -> dict:
        return {"name": self.name, "normalisation": vars(self.normalise)}


@register_metric("exact_match")
class ExactMatch(TextMetric):
    """1 when the normalised response equals a normalised answer."""

    def compare(self, response: str, answer: str) -> float:
        return float(response == answer)


@register_metric("contains")
class Contains(TextMetric):
    """1 when a normalised (non-empty) answer occurs in the normalised response."""

    def compare(self, response: str, answer: str) -> float:
        return float(bool(answer) and answer in response)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)*len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens; 1 when both are empty, 0 when only one is."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@register_metric("rouge_l")
class RougeL(TextMetric):
    """ROUGE-L F1 (longest common subsequence of normalised whitespace tokens)."""

    binary = False

    def compare(self, response: str, answer: str) -> float:
        return rouge_l_f1(response, answer)


def choice_index(example, n_choices: int) -> int:
    """The answer of a multiple-choice example as a 0-based index.

    Accepts an int or digit string (0-based index), a single letter A, B, ... or the text of
    one of the choices.
    """
    answer, choices = example.answer, list(example.choices)
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - ord("A")
    elif answer in choices:
        index = choices.index(answer)
    else:
        raise ValueError(f"multiple_choice: answer {answer!r} is no index, letter or choice")
    if not 0 <= index < n_choices:
        raise ValueError(f"multiple_choice: answer {answer!r} out of range for {n_choices} choices")
    return index


@register_metric("multiple_choice")
class MultipleChoice(Metric):
    """1 when the answer choice has the highest log-likelihood as the response to the prompt.

    The prompt (which should show the choices) is formatted with the chat template and each
    choice is scored as the start of the assistant's reply; no generation. With
    ``length_normalise`` the mean per-token log-likelihood is compared instead of the sum.
    """

    needs_response = False
    needs_choices = True

    def __init__(self, length_normalise: bool = False):
        self.length_normalise = bool(length_normalise)

    def score(self, examples, responses, *, model=None, tokenizer=None, batch_size=16, **_):
        if model is None or tokenizer is None:
            raise ValueError("multiple_choice: needs the model and its tokenizer")
        pairs, spans, answers = [], [], []
        for example in examples:
            choices = getattr(example, "choices", None)
            if not choices or len(choices) < 2:
                raise ValueError(f"multiple_choice: example {example.prompt[:40]!r} has no choices")
            answers.append(choice_index(example, len(choices)))
            context = chat_prompt(tokenizer, example.prompt)
            context_ids = encode_chat(tokenizer, [example.prompt])[0]
            spans.append((len(pairs), len(pairs) + len(choices)))
            for choice in choices:
                tokens = split_continuation(tokenizer, context_ids, context, choice)
                pairs.append((context_ids, tokens))
        scored = continuation_logprobs(
            model, pairs, pad_id=ensure_pad_token(tokenizer), batch_size=batch_size
        )
        values = [total / count if self.length_normalise else total for total, count in scored]
        results = []
        for (start, end), answer in zip(spans, answers, strict=True):
            options = values[start:end]
            results.append(float(max(range(len(options)), key=options.__getitem__) == answer))
        return results

    def describe(self) -> dict:
        return {"name": self.name, "length_normalise": self.length_normalise}


@register_metric("perplexity")
class Perplexity(Metric):
    """Per example exp(-mean token log-likelihood) = 1 / perplexity (higher is better).

    Scores raw text (no chat template): the answer given the prompt when the example has a
    non-empty answer, else the prompt text itself. Texts are cut to ``max_tokens`` tokens.
    """

    needs_response = False
    needs_answer = False
    binary = False

    def __init__(self, max_tokens: int | str = 1024):
        self.max_tokens = int(max_tokens)

    def score(self, examples, responses, *, model=None, tokenizer=None, batch_size=16, **_):
        if model is None or tokenizer is None:
            raise ValueError("perplexity: needs the model and its tokenizer")
        pairs = []
        for example in examples:
            ids = tokenizer(example.prompt)["input_ids"]
            if example.answer:
                pair = (ids, split_continuation(tokenizer, ids, example.prompt, example.answer))
            else:
                pair = (ids[:1], ids[1:])
            context, continuation = pair[0][: self.max_tokens - 1], pair[1]
            continuation = continuation[: self.max_tokens - len(context)]
            if len(context) + len(continuation) < 2 or not continuation:
                raise ValueError(f"perplexity: text {example.prompt[:40]!r} has under two tokens")
            pairs.append((context, continuation))
        scored = continuation_logprobs(
            model, pairs, pad_id=ensure_pad_token(tokenizer), batch_size=batch_size
        )
        return [math.exp(total / count) for total, count in scored]

    def describe(self) -> dict:
        return {"name": self.name, "reported_as": "1/perplexity", "max_tokens": self.max_tokens}
