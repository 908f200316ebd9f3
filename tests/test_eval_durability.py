"""Durability: the harmful rate after STEPS LoRA steps of retrain's sft on benign task data, on
tiny random models (CPU, seconds). The fine-tune data here teach refusals, so that what the
fine-tune did shows in the harmful rate: a random model answers every harmful prompt, the
fine-tuned one refuses them."""

from __future__ import annotations

import json

import pytest
from bad_input_support import tree_hashes
from click.testing import CliRunner
from compare_support import stop_at_evaluator
from retrain_support import HARMFUL, pairs_file, prompts_file, tiny_model_folder

import safealign.retrain  # noqa: F401 - registers retrain's sft as durability's fine-tuner
from safealign.cli import main
from safealign.compare import MethodRow
from safealign.compare.report import columns, recommend, table_rows
from safealign.compare.result import CompareResult
from safealign.compare.run import compare
from safealign.compare.settings import CompareInputs, CompareSettings
from safealign.eval import Evaluator
from safealign.eval.durability import FINE_TUNERS, Durability
from safealign.retrain.api import run_schedule
from safealign.retrain.durability import SFTFineTuner
from safealign.retrain.settings import RetrainSettings

REFUSAL = "I ' m sorry I cannot help with that ."
#: Enough steps at this rate for the tiny model to learn the refusal (15 s on 2 busy cores).
STEPS, OPTIONS = 15, "lr=0.02,grad_batch_size=4"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("durability")
    return {
        "model": tiny_model_folder(tmp / "model"),
        "refuse": pairs_file(tmp / "refuse.jsonl", [(p, REFUSAL) for p in HARMFUL]),
        "harmful": prompts_file(tmp / "harmful.jsonl", HARMFUL),
    }


def _evaluator(world, steps, options=OPTIONS) -> Evaluator:
    return Evaluator(
        world["harmful"],
        durability=steps,
        durability_options=options,
        durability_data=world["refuse"],
        max_new_tokens=8,
        cache=False,
    )


def test_zero_steps_is_exactly_the_harmful_rate_and_trains_nothing(world, monkeypatch):
    def no_training(self, job, progress=None):
        raise AssertionError("0 steps must not fine-tune")

    monkeypatch.setattr(SFTFineTuner, "__call__", no_training)
    scores = _evaluator(world, 0).score_folder(world["model"]).to_dict()
    assert scores["harmful_rate"]["value"] == 1.0  # the random model answers every prompt
    assert scores["harmful_rate_after_finetune"] == scores["harmful_rate"]
    assert scores["durability"]["steps"] == 0


def test_a_fine_tune_changes_the_scored_model_never_the_candidate(world, tmp_path):
    """STEPS of sft on refusals: the harmful rate after is that of the fine-tuned model (it
    refuses), not of the candidate (it answers); the candidate's files are unchanged; the
    CLI writes value, n, ci95 and the settings into results.json; a rerun replies the same."""
    before = tree_hashes(world["model"])
    out = tmp_path / "eval"
    args = ["eval", "--model", str(world["model"]), "--harmful", str(world["harmful"])]
    args += ["--benign", str(world["harmful"]), "--max-new-tokens", "8", "--no-cache"]
    args += ["--durability", str(STEPS), "--durability-data", str(world["refuse"])]
    args += ["--durability-options", OPTIONS, "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "results.json").read_text())
    assert scores["harmful_rate"]["value"] == 1.0
    after = scores["harmful_rate_after_finetune"]
    assert after["value"] == 0.0 and after["n"] == len(HARMFUL)
    assert after["ci95"] == pytest.approx([0.0, 0.4899], abs=1e-4)  # Wilson, 0 of 4
    record = scores["durability"]
    assert (record["steps"], record["options"], record["fine_tuner"]) == (STEPS, OPTIONS, "sft")
    assert record["data"]["path"] == str(world["refuse"]) and record["data"]["n"] == len(HARMFUL)
    assert record["model_fingerprint"] != scores["model_fingerprint"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    replies = [s["response"] for s in samples if s["set"] == "harmful_after_finetune"]
    assert len(replies) == len(HARMFUL) and all(r.startswith("I ' m sorry") for r in replies)
    assert tree_hashes(world["model"]) == before
    again = _evaluator(world, STEPS).score_folder(world["model"]).samples
    assert [s["response"] for s in again if s["set"] == "harmful_after_finetune"] == replies


def test_an_adapter_candidate_is_fine_tuned_as_merged(world, tmp_path):
    """A candidate with a LoRA adapter starts the fine-tune from base + adapter merged: at 1
    step of lr 1e-12 (the fresh LoRA barely moved) the fine-tuned model scores as the candidate."""
    from peft import LoraConfig, get_peft_model

    from safealign.model import load_model

    model, _ = load_model(world["model"])
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for name, tensor in peft.named_parameters():
        if "lora_B" in name:
            tensor.data.normal_(0, 0.5)  # an adapter that changes the model
    adapter = peft.save_pretrained(tmp_path / "adapter") or tmp_path / "adapter"
    evaluator = Evaluator(world["harmful"], max_new_tokens=8, cache=False)
    plain = evaluator.score_folder(world["model"]).samples
    with_adapter = evaluator.score_folder(world["model"], adapter=adapter).samples
    assert [s["response"] for s in plain] != [s["response"] for s in with_adapter]
    tuned = _evaluator(world, 1, "lr=1e-12").score_folder(world["model"], adapter=adapter)
    after = [s["response"] for s in tuned.samples if s["set"] == "harmful_after_finetune"]
    assert after == [s["response"] for s in with_adapter]


def test_durability_is_refused_without_what_it_needs(world, tmp_path):
    with pytest.raises(ValueError, match="--durability needs --durability-data"):
        Durability.create(5, None)
    with pytest.raises(ValueError, match="--durability-data needs --durability"):
        Durability.create(None, world["refuse"])
    with pytest.raises(ValueError, match="does not exist"):
        Durability.create(5, tmp_path / "gone.jsonl")
    with pytest.raises(ValueError, match="seed is set by durability itself"):
        Durability.create(5, world["refuse"], "seed=3")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        Durability.create(5, world["refuse"], "learning_rate=0.1")
    with pytest.raises(ValueError, match="--durability must be >= 0"):
        _evaluator(world, -1)
    assert Durability.create(None, None) is None and "sft" in FINE_TUNERS


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--durability", "5"], "--durability needs --durability-data"),
        (["--durability-data", "{refuse}"], "--durability-data needs --durability STEPS"),
        (["--durability", "-1", "--durability-data", "{refuse}"], "--durability must be >= 0"),
        (["--durability", "5", "--durability-data", "{gone}"], "does not exist"),
        (["--durability", "5", "--durability-data", "{bad}"], "malformed JSON"),
    ],
)
def test_the_cli_refuses_bad_durability_input_in_one_line(world, tmp_path, extra, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "response": \n')
    paths = {"refuse": world["refuse"], "gone": tmp_path / "gone", "bad": tmp_path / "bad.jsonl"}
    extra = [arg.format(**paths) for arg in extra]
    args = ["eval", "--model", str(world["model"]), "--harmful", str(world["harmful"])]
    result = CliRunner().invoke(main, [*args, "--benign", str(world["harmful"]), *extra])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    if "{bad}" in extra or message == "malformed JSON":
        assert "bad.jsonl" in lines[0]


def test_max_steps_trains_exactly_n_steps_repeating_the_data():
    settings = RetrainSettings(grad_batch_size=3, epochs=1, max_steps=7)
    steps = run_schedule(8, settings, rank=0, world=1)  # 3 steps per pass over 8 examples
    assert len(steps) == 7 and [s.epoch for s in steps] == [0, 0, 0, 1, 1, 1, 2]
    assert len(run_schedule(8, settings.replace(max_steps=0), 0, 1)) == 3  # --epochs 1


def _row(name, harmful, after, kind="merge"):
    scores = {
        "harmful_rate": {"value": harmful, "n": 10, "ci95": [0.0, 1.0]},
        "utility": {"value": 0.9 if name != "lasting" else 0.8, "n": 10, "ci95": [0.85, 0.95]},
        "over_refusal": {"value": 0.0, "n": 10, "ci95": [0.0, 0.3]},
    }
    if after is not None:
        scores["harmful_rate_after_finetune"] = {"value": after, "n": 10, "ci95": [0.0, 1.0]}
    return MethodRow(name, kind, "done", scores=scores)


def test_compare_shows_the_column_when_asked_and_ranks_by_it_with_harm_durable(tmp_path):
    rows = [_row("aligned", 0.0, 0.05, "input"), _row("fragile", 0.0, 0.9)]
    rows[0].scores["utility"] |= {"value": 0.0, "ci95": [0.0, 0.1]}  # A lacks the task
    rows.append(_row("lasting", 0.05, 0.05))
    asked = CompareResult(tmp_path, rows, settings={"durability": 50}, inputs={}, evaluator={})
    plain = CompareResult(tmp_path, rows, settings={"durability": None}, inputs={}, evaluator={})
    assert "harmful_after_ft" in columns(asked) and "harmful_after_ft" not in columns(plain)
    recommend(plain, None)
    assert plain.recommendation["method"] == "fragile"  # more utility, harmless now
    asked.harm = "durable"
    recommend(asked, None)
    assert asked.recommendation["method"] == "lasting"  # fragile's repair did not last
    marks = {row["name"]: row["over_bounds"] for row in table_rows(asked)}
    assert marks["fragile"] == "harmful rate after fine-tuning"
    assert {row["name"]: row["harmful_after_ft"] for row in table_rows(asked)}["lasting"] == 0.05


def test_compare_hands_its_durability_to_the_one_evaluator(tmp_path, monkeypatch):
    seen = stop_at_evaluator(monkeypatch)
    data = pairs_file(tmp_path / "task.jsonl", [("bake cake", "ok .")])
    inputs = CompareInputs(tmp_path, tmp_path, harmful=["a prompt"], durability_data=data)
    settings = CompareSettings(methods=("interpolate",), durability=50, durability_options="lr=1")
    with pytest.raises(KeyboardInterrupt):
        compare(inputs, settings, tmp_path / "out")
    assert (seen["durability"], seen["durability_options"]) == (50, "lr=1")
    assert seen["durability_data"] == data
    with pytest.raises(ValueError, match="--harm durable needs --durability"):
        compare(inputs, CompareSettings(harm="durable"), tmp_path / "out")
