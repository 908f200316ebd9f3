"""The Evaluator: harmful rate, utility and over-refusal of a model, in memory or on disk."""

from __future__ import annotations

import hashlib
import sys
import time
from functools import cached_property
from pathlib import Path

import torch

from safealign.data import PromptSet
from safealign.eval.cache import ResponseCache, folder_fingerprint
from safealign.eval.coherence import Coherence, coherence
from safealign.eval.drift import Drift, DriftReference
from safealign.eval.durability import Durability
from safealign.eval.generation import Decided, generate
from safealign.eval.judges import Judge, JudgeError, Verdict, get_judge
from safealign.eval.metrics import get_metric
from safealign.eval.results import Scores, mean_interval, wilson_interval
from safealign.eval.sets import as_task_list, limited_prompts
from safealign.eval.settings import EvalSettings
from safealign.model import load_model, model_device
from safealign.progress import ProgressCallback, say
from safealign.runtime import peak_rss_bytes, versions


class Evaluator:
    """Scores a model on harmful, task and benign sets.

    ``harmful``/``benign``: a path, a PromptSet or a list of strings. ``task``: a path, a
    TaskSet or a list of examples (``prompt``, ``answer``, optional ``choices``).
    ``settings`` (an :class:`EvalSettings`, or its fields as keywords) choose the judge of
    refusals on harmful prompts, the refusal judge on benign prompts (default: ``judge`` when
    it detects refusals, else ``keyword``), the metric, decoding, ``limit`` (the first N of
    each set) and the response cache. ``progress`` gets status lines (and shows bars); None is
    silent.

    ``drift_reference`` (the fine-tuned model B: a folder or hub id, with
    ``drift_reference_adapter`` a LoRA adapter on it, loaded on the first score; or a
    :class:`~safealign.eval.drift.DriftReference` already built, see :meth:`build_reference`)
    adds ``drift`` on the benign prompts.

    ``durability_data`` (benign task data, prompt and reply pairs) with ``settings.durability``
    STEPS adds ``harmful_rate_after_finetune`` to :meth:`score_folder`'s scores: the harmful
    rate after STEPS LoRA steps of fine-tuning on it (:mod:`safealign.eval.durability`).

    ``stop_when_decided`` stops the reply to each harmful prompt that no other set reads once the
    judge's verdict on it is decided (:meth:`~safealign.eval.judges.Judge.decided`): the same
    harmful rate from fewer tokens, but replies cut short, so those replies get no coherence
    label and ``safe_and_coherent_rate`` is not reported.
    """

    def __init__(
        self,
        harmful=None,
        task=None,
        benign=None,
        *,
        settings: EvalSettings | None = None,
        progress: ProgressCallback = None,
        drift_reference: DriftReference | str | Path | None = None,
        drift_reference_adapter: str | Path | None = None,
        durability_data: str | Path | None = None,
        **kw,
    ):
        self.settings = settings = (settings or EvalSettings()).replace(**kw)
        self.durability = Durability.create(
            settings.durability, durability_data, settings.durability_options
        )
        self.drift_reference = drift_reference
        self.drift_reference_adapter = drift_reference_adapter
        self.progress = progress
        self.harmful = limited_prompts(harmful, "harmful", settings.limit)
        if self.durability is not None and not self.harmful:
            raise ValueError("--durability scores harm again: give harmful prompts")
        self.benign = limited_prompts(benign, "benign", settings.limit)
        self.metric = get_metric(settings.metric)
        self.task = as_task_list(task, self.metric, settings.limit)
        self.judge = get_judge(settings.judge)
        refusal_judge = settings.refusal_judge
        if refusal_judge is None:
            refusal_judge = self.judge if self.judge.detects_refusal else "keyword"
        self.refusal_judge = get_judge(refusal_judge)
        if not self.refusal_judge.detects_refusal:
            raise ValueError(f"refusal judge {self.refusal_judge.name!r} does not detect refusals")

    def harm_only(self) -> Evaluator:
        """An evaluator of this one's harmful prompts alone, with its settings (no drift, no
        durability): what durability scores the fine-tuned model with."""
        settings = self.settings.replace(durability=None, limit=None)
        return Evaluator(self.harmful, settings=settings, progress=self.progress)

    def build_reference(self, model, tokenizer, source: dict | None = None) -> DriftReference:
        """The drift reference of ``model`` (B, loaded) on this evaluator's benign prompts, with
        its drift tokens, batch size and system prompt; ``source`` is recorded with it."""
        if not self.benign:
            raise ValueError("drift is measured on benign prompts: give a benign set")
        was_training = model.training
        model.eval()
        try:
            return DriftReference.build(
                model,
                tokenizer,
                self.benign.prompts,
                tokens=self.settings.drift_tokens,
                batch_size=self.settings.batch_size,
                system=self.settings.system,
                source=source,
            )
        finally:
            model.train(was_training)

    def _reference(self) -> DriftReference | None:
        """The drift reference, loaded and built from its checkpoint on first use (then B is
        freed); None without one."""
        if self.drift_reference is None or isinstance(self.drift_reference, DriftReference):
            return self.drift_reference
        path, adapter = self.drift_reference, self.drift_reference_adapter
        self.say(
            f"drift: replies of the reference {path}" + (f" with {adapter}" if adapter else "")
        )
        source = {"model": str(path), "adapter": str(adapter) if adapter else None}
        source["fingerprint"] = folder_fingerprint(path, adapter, cache_dir=self.settings.cache_dir)
        model, tokenizer = load_model(
            path, adapter=adapter, dtype=self.settings.dtype, device=self.settings.device
        )
        self.drift_reference = self.build_reference(model, tokenizer, source)
        return self.drift_reference

    def decoding(self, tokenizer) -> dict:
        """Decoding settings: part of the cache key and of results.json."""
        template = getattr(tokenizer, "chat_template", None) or ""
        decoding = {
            "strategy": "greedy",
            "max_new_tokens": self.settings.max_new_tokens,
            "system": self.settings.system,
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        }
        if self._stoppable:
            decoding["stop_when_decided_by"] = self.judge.describe()
        return decoding

    @cached_property
    def _stoppable(self) -> set[str]:
        """The harmful prompts whose replies stop once the judge has decided: with
        ``stop_when_decided`` and a judge that decides early, those no other set reads."""
        if not (self.settings.stop_when_decided and self.harmful and self.judge.decides_early):
            return set()
        others = set(self.benign.prompts) if self.benign else set()
        others |= {e.prompt for e in self.task.examples} if self.task else set()
        return set(self.harmful.prompts) - others

    def responses(
        self, model, tokenizer, prompts: list[str], model_fingerprint: str | None
    ) -> tuple[dict[str, str], int]:
        """Responses to the unique prompts (cached where possible) and how many were generated."""
        unique = list(dict.fromkeys(prompts))
        found: dict[str, str] = {}
        cache = None
        if self.settings.cache and model_fingerprint and unique:
            cache = ResponseCache(self.settings.cache_dir)
            keys = cache.keys(model_fingerprint, unique, self.decoding(tokenizer))
            keys = dict(zip(unique, keys, strict=True))
            hits = cache.get(list(keys.values()))
            found = {p: hits[k] for p, k in keys.items() if k in hits}
        missing = [p for p in unique if p not in found]
        if found:
            self.say(f"{len(found)} responses from the cache")
        new = dict(zip(missing, self._generate(model, tokenizer, missing), strict=True))
        if cache is not None and new:
            cache.put({keys[p]: r for p, r in new.items()})
        return {**found, **new}, len(missing)

    def _decided(self) -> Decided | None:
        """When a reply may stop (a stoppable prompt's, its verdict decided); None: never."""
        stoppable, judge = self._stoppable, self.judge
        if not stoppable:
            return None

        def decided(prompt: str, text: str) -> bool:
            return prompt in stoppable and judge.decided(prompt, text)

        return decided

    def say(self, line: str) -> None:
        """A status line to ``progress``, if any."""
        say(self.progress, line)

    def _generate(self, model, tokenizer, prompts: list[str]) -> list[str]:
        """Greedy responses, a batch at a time under a progress bar (with ``progress``)."""
        from tqdm.auto import tqdm

        size = self.settings.batch_size
        chunk = size if isinstance(size, int) else 64  # 'auto' halves inside each chunk
        decided = self._decided()
        responses: list[str] = []
        with tqdm(
            total=len(prompts),
            desc="eval: generating",
            unit="prompt",
            disable=self.progress is None or not prompts,
            file=sys.stderr,
        ) as bar:
            for start in range(0, len(prompts), chunk):
                batch = prompts[start : start + chunk]
                responses += generate(
                    model,
                    tokenizer,
                    batch,
                    batch_size=size,
                    max_new_tokens=self.settings.max_new_tokens,
                    system=self.settings.system,
                    decided=decided,
                )
                bar.update(len(batch))
        return responses

    def score(self, model, tokenizer, *, fingerprint: str | None = None) -> Scores:
        """Evaluate ``model``; ``fingerprint`` enables the response cache for in-memory models."""
        start = time.perf_counter()
        torch.manual_seed(self.settings.seed)
        device = model_device(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        was_training = model.training
        model.eval()
        try:
            scores = self._score(model, tokenizer, fingerprint)
        finally:
            model.train(was_training)
        scores.seconds = time.perf_counter() - start
        scores.config["wall_seconds"] = scores.seconds
        scores.peak_memory_bytes = peak_rss_bytes()
        if device.type == "cuda":
            scores.peak_cuda_bytes = torch.cuda.max_memory_allocated(device)
        return scores

    def _wanted(self) -> list[str]:
        """The prompts whose responses some judge or the metric reads."""
        wanted: list[str] = []
        if self.harmful and self.judge.needs_response:
            wanted += self.harmful.prompts
        if self.benign and self.refusal_judge.needs_response:
            wanted += self.benign.prompts
        if self.task and self.metric.needs_response:
            wanted += [e.prompt for e in self.task.examples]
        return wanted

    def _score(self, model, tokenizer, model_fingerprint: str | None) -> Scores:
        answers, n_generated = self.responses(model, tokenizer, self._wanted(), model_fingerprint)
        options = {"model": model, "tokenizer": tokenizer, "batch_size": self.settings.batch_size}
        samples: list[dict] = []
        intervals: dict[str, tuple[float, float]] = {}
        cut = self._stoppable
        coherent = {p: coherence(reply, p) for p, reply in answers.items() if p not in cut}
        harmful_rate = over_refusal = utility = safe_and_coherent_rate = None
        if self.harmful:
            prompts = self.harmful.prompts
            verdicts = self._judge(self.judge, prompts, answers, options)
            complied = sum(not v.refused for v in verdicts)
            harmful_rate = complied / len(verdicts)
            intervals["harmful_rate"] = wilson_interval(complied, len(verdicts))
            if self.judge.needs_response and not cut:
                safe = sum(
                    v.refused and not coherent[p].incoherent
                    for p, v in zip(prompts, verdicts, strict=True)
                )
                safe_and_coherent_rate = safe / len(verdicts)
                intervals["safe_and_coherent_rate"] = wilson_interval(safe, len(verdicts))
            samples += _judged_samples("harmful", prompts, answers, verdicts, coherent)
        if self.benign:
            verdicts = self._judge(self.refusal_judge, self.benign.prompts, answers, options)
            refused = sum(v.refused for v in verdicts)
            over_refusal = refused / len(verdicts)
            intervals["over_refusal"] = wilson_interval(refused, len(verdicts))
            samples += _judged_samples("benign", self.benign.prompts, answers, verdicts, coherent)
        if self.task:
            utility, intervals["utility"], task_samples = self._utility(answers, options, coherent)
            samples += task_samples
        reference = self._reference() if self.benign else None
        drift = reference.score(model) if reference is not None else None
        if drift is not None:
            if drift.interval is not None:
                intervals["drift"] = drift.interval
            _add_drift(samples, drift)
        return Scores(
            harmful_rate=harmful_rate,
            utility=utility,
            over_refusal=over_refusal,
            safe_and_coherent_rate=safe_and_coherent_rate,
            incoherent_rate=_incoherent_rates(samples, intervals),
            drift=drift.mean if drift is not None else None,
            n_harmful=len(self.harmful.prompts) if self.harmful else 0,
            n_task=len(self.task.examples) if self.task else 0,
            n_benign=len(self.benign.prompts) if self.benign else 0,
            seconds=0.0,
            peak_memory_bytes=0,
            intervals=intervals,
            config=self._config(tokenizer, model_fingerprint, n_generated, reference),
            samples=samples,
        )

    def _utility(self, answers: dict[str, str], options: dict, coherent: dict[str, Coherence]):
        """(utility, its interval, the task samples)."""
        examples = self.task.examples
        responses = None
        if self.metric.needs_response:
            responses = [answers[e.prompt] for e in examples]
        values = self.metric.score(examples, responses, **options)
        if self.metric.binary:
            interval = wilson_interval(round(sum(values)), len(values))
        else:
            interval = mean_interval(values)
        samples = [
            {
                "set": "task",
                "prompt": example.prompt,
                "response": responses[i] if responses is not None else None,
                "answer": example.answer,
                "score": value,
                "label": ("correct" if value == 1 else "incorrect") if self.metric.binary else None,
                "coherence": _coherence_entry(coherent, example.prompt, responses),
            }
            for i, (example, value) in enumerate(zip(examples, values, strict=True))
        ]
        return sum(values) / len(values), interval, samples

    @staticmethod
    def _judge(judge: Judge, prompts, answers, options) -> list[Verdict]:
        responses = [answers[p] for p in prompts] if judge.needs_response else None
        verdicts = judge.judge(prompts, responses, **options)
        if len(verdicts) != len(prompts):
            raise JudgeError(f"{judge.name}: {len(verdicts)} verdicts for {len(prompts)} prompts")
        return verdicts

    def _config(
        self,
        tokenizer,
        model_fingerprint: str | None,
        n_generated: int,
        reference: DriftReference | None,
    ) -> dict:
        sets = {}
        for role, item in (("harmful", self.harmful), ("benign", self.benign), ("task", self.task)):
            if item is not None:
                n = len(item.prompts) if isinstance(item, PromptSet) else len(item.examples)
                sets[role] = {"name": item.name, "n": n, "hash": item.hash}
        return {
            "judge": self.judge.describe(),
            "refusal_judge": self.refusal_judge.describe(),
            "metric": self.metric.describe(),
            "decoding": self.decoding(tokenizer),
            "batch_size": self.settings.batch_size,
            "limit": self.settings.limit,
            "sets": sets,
            "model_fingerprint": model_fingerprint,
            "responses_generated": n_generated,
            "seed": self.settings.seed,
            "drift_reference": reference.describe() if reference is not None else None,
            "versions": versions(),
        }

    def score_folder(
        self,
        model_path: str | Path,
        *,
        adapter: str | Path | None = None,
        dtype: str = "auto",
        device: str | None = None,
    ) -> Scores:
        """Load a model folder (and adapter), fingerprint it, and score it with the cache.

        ``seconds`` includes fingerprinting and loading (``load_seconds`` in the config).
        """
        start = time.perf_counter()
        cache_dir = self.settings.cache_dir
        self.say(f"hashing the weights of {model_path} (results.json's fingerprint, cache key)")
        model_fingerprint = folder_fingerprint(model_path, adapter, cache_dir=cache_dir)
        self.say(f"loading {model_path}" + (f" with adapter {adapter}" if adapter else ""))
        model, tokenizer = load_model(model_path, adapter=adapter, dtype=dtype, device=device)
        load_seconds = time.perf_counter() - start
        scores = self.score(model, tokenizer, fingerprint=model_fingerprint)
        scores.seconds += load_seconds
        scores.config["wall_seconds"] = scores.seconds
        scores.config["load_seconds"] = load_seconds
        scores.config["model"] = {
            "path": str(model_path),
            "adapter": str(adapter) if adapter else None,
            "dtype": dtype,
        }
        if self.durability is not None:
            del model  # the fine-tune loads its own copy
            start = time.perf_counter()
            after = self.durability.score(self, model_path, adapter)
            self.durability.add_to(scores, after)
            scores.config["durability"]["seconds"] = time.perf_counter() - start
            scores.seconds += scores.config["durability"]["seconds"]
            scores.config["wall_seconds"] = scores.seconds
        return scores


def _coherence_entry(coherent: dict[str, Coherence], prompt: str, responses) -> dict | None:
    """A sample's coherence label; None when no reply was generated for its set."""
    return coherent[prompt].to_dict() if responses is not None else None


def _judged_samples(role, prompts, answers, verdicts, coherent) -> list[dict]:
    """Samples of a judged set; ``label`` is ``incoherent`` for an incoherent reply, whatever
    the judge said (its verdict stays under ``judge``)."""
    samples = []
    for prompt, verdict in zip(prompts, verdicts, strict=True):
        entry = coherent.get(prompt)
        incoherent = entry is not None and entry.incoherent
        samples.append(
            {
                "set": role,
                "prompt": prompt,
                "response": answers.get(prompt),
                "judge": verdict.to_dict(),
                "label": "incoherent" if incoherent else verdict.label,
                "coherence": entry.to_dict() if entry is not None else None,
            }
        )
    return samples


def _add_drift(samples: list[dict], drift: Drift) -> None:
    """Each benign sample's drift (nats) and the reply positions it averages, in set order."""
    benign = [sample for sample in samples if sample["set"] == "benign"]
    for sample, value, positions in zip(benign, drift.values, drift.positions, strict=True):
        sample["drift"] = {"kl": value, "positions": positions}


def _incoherent_rates(samples: list[dict], intervals: dict) -> dict[str, float]:
    """Per set with replies, the share labelled incoherent (its interval put in ``intervals``)."""
    rates = {}
    for role in ("harmful", "benign", "task"):
        entries = [s["coherence"] for s in samples if s["set"] == role]
        if entries and all(entries):
            flagged = sum(entry["incoherent"] for entry in entries)
            rates[role] = flagged / len(entries)
            intervals[f"incoherent_rate.{role}"] = wilson_interval(flagged, len(entries))
    return rates
