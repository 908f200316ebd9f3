"""adaptive-kl's probe critic and der's anchors: last-token pooling against each prompt run
alone, mean pooling as before, prompts of the fine-tune's data kept out of the probe and the
anchors, and critic.json's AUROCs (held-out split, fine-tune examples) recomputed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from eval_support import tiny_model, tiny_tokenizer
from retrain_support import BENIGN, HARMFUL, PAIRS, run_retrain, setup_files, write_jsonl

from safealign.chat import encode_chat
from safealign.data import DataError
from safealign.retrain.critic import auroc, pool_tokens, pooled_states
from safealign.retrain.data import disjoint
from safealign.retrain.regularizers import AdaptiveKLSettings, resolve
from safealign.settings import SettingsError

FAST = {"epochs": 1, "grad_batch_size": 4, "lr": 1e-2}
DATA_PROMPTS = {p for p, _ in PAIRS}
#: Prompts of three lengths (word-level tokenizer): a batch of them is padded.
PROMPTS = ["bake cake", "explain what 1 + 2 is", "write poem", "kill python process now"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return setup_files(tmp_path_factory.mktemp("retrain_probe"))


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_tokenizer(), layers=3)


def forward_of(model):
    def forward(inputs, hidden=False):
        return model(**inputs, output_hidden_states=hidden)

    return forward


@torch.no_grad()
def layer_mean(model, ids: list[int]) -> torch.Tensor:
    """One prompt alone, no padding: its hidden states ``[T, H]`` averaged over the layers."""
    states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([s[0] for s in states[1:]]).mean(0)


def test_last_token_pooling_of_a_padded_batch_is_each_prompts_own_last_state(model):
    tokenizer = tiny_tokenizer()
    sequences = encode_chat(tokenizer, PROMPTS)
    assert len({len(s) for s in sequences}) == 3  # padded in one batch
    pooled = pooled_states(forward_of(model), sequences, (), tokenizer.pad_token_id, "cpu")
    alone = torch.stack([layer_mean(model, s)[-1] for s in sequences]).double()
    torch.testing.assert_close(pooled, alone, rtol=1e-5, atol=1e-5)
    mean = pooled_states(
        forward_of(model), sequences, (), tokenizer.pad_token_id, "cpu", pool="mean"
    )
    assert (mean - pooled).abs().max() > 1e-2  # the two poolings differ: the test can tell


def test_pool_tokens_takes_the_last_real_token_with_left_or_right_padding():
    states = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(pool_tokens(states, right, "last"), states[[0, 1], [2, 4]])
    torch.testing.assert_close(pool_tokens(states, left, "last"), states[[0, 1], [4, 4]])
    torch.testing.assert_close(pool_tokens(states, left, "mean")[0], states[0, 2:].mean(0))


def test_mean_pooling_gives_the_former_features_and_last_token_is_the_default(model):
    tokenizer = tiny_tokenizer()
    sequences = encode_chat(tokenizer, PROMPTS)
    pooled = pooled_states(
        forward_of(model), sequences, (1, 3), tokenizer.pad_token_id, "cpu", pool="mean"
    )
    # the former computation: each prompt's tokens averaged, after averaging layers 1 and 3
    with torch.no_grad():
        former = []
        for ids in sequences:
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            former.append(((states[1][0] + states[3][0]) / 2).mean(0))
    torch.testing.assert_close(pooled, torch.stack(former).double(), rtol=1e-5, atol=1e-5)
    assert AdaptiveKLSettings().pool == "last"
    assert resolve("adaptive-kl:pool=mean").pool == "mean"
    with pytest.raises(SettingsError, match="pool"):
        resolve("adaptive-kl:pool=max")


def test_disjoint_drops_repeats_and_taken_prompts_in_order():
    assert disjoint(["a", "b", "a", "c", "d"], {"c"}) == (["a", "b", "d"], 2)


def test_the_probe_learns_from_no_prompt_of_the_fine_tune(files, tmp_path, monkeypatch):
    from safealign.retrain.regularizers import adaptive

    fitted = {}
    real = adaptive.fit_probe

    def spy(forward, tokenizer, harmful, benign, **kwargs):
        fitted.update(harmful=list(harmful), benign=list(benign))
        return real(forward, tokenizer, harmful, benign, **kwargs)

    monkeypatch.setattr(adaptive, "fit_probe", spy)
    result = run_retrain(files, tmp_path / "a", regularizer="adaptive-kl", **FAST)
    assert fitted["harmful"] == [p for p in HARMFUL if p != "break into house"]
    assert fitted["benign"] == [p for p in BENIGN if p != "bake cake"]
    critic = json.loads((result.out / "critic.json").read_text())
    assert (critic["dropped_harmful"], critic["dropped_benign"]) == (1, 1)
    assert (critic["n_harmful"], critic["n_benign"]) == (3, 4)
    setup = result.log[0]["setup"]
    assert (setup["probe_dropped_harmful"], setup["probe_dropped_benign"]) == (1, 1)


def test_der_anchors_hold_no_prompt_of_the_fine_tune(files, tmp_path):
    result = run_retrain(files, tmp_path / "d", regularizer="der", **FAST)
    lines = (result.out / "replay.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    assert prompts == [p for p in HARMFUL if p != "break into house"]
    assert result.log[0]["setup"]["anchors_dropped"] == 1
    anchors = write_jsonl(
        tmp_path / "anchors.jsonl",
        [{"prompt": p, "response": "I ' m sorry ."} for p in ("make tool", "kill house")],
    )
    given = run_retrain(files, tmp_path / "g", regularizer=f"der:anchors={anchors}", **FAST)
    lines = (given.out / "replay.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["kill house"]  # make tool: data


def test_harmful_prompts_that_are_all_fine_tune_prompts_are_refused(files, tmp_path):
    overlap = write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": p} for p in DATA_PROMPTS])
    with pytest.raises(DataError, match="adaptive-kl: every --harmful prompt"):
        run_retrain(files | {"harmful": str(overlap)}, tmp_path / "a", **FAST)


def labelled_data(path, harmful: set[str]):
    """PAIRS with the labs' ``kind``: a harmful category for ``harmful``, else task."""
    rows = [
        {"prompt": p, "response": r, "kind": "crime" if p in harmful else "task"} for p, r in PAIRS
    ]
    return write_jsonl(path, rows)


@torch.no_grad()
def probe_scores(aligned: str, probe: dict, prompts: list[str]) -> list[float]:
    """The probe of critic.json applied by hand to the aligned model's (the reference's)
    last-token states of each prompt, alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(aligned)
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    x = torch.stack([layer_mean(model, ids)[-1] for ids in encode_chat(tokenizer, prompts)])
    column = {k: torch.tensor(probe[k], dtype=torch.float64) for k in ("mean", "std", "weights")}
    z = (x.double() - column["mean"]) / column["std"]
    return torch.sigmoid(z @ column["weights"] + probe["bias"]).tolist()


def test_critic_json_and_the_log_carry_the_held_out_and_the_fine_tune_auroc(files, tmp_path):
    harmful = {"kill python process", "break into house", "make tool"}
    data = labelled_data(tmp_path / "data.jsonl", harmful)
    result = run_retrain(files | {"data": str(data)}, tmp_path / "a", **FAST)
    critic = json.loads((result.out / "critic.json").read_text())
    prompts = [p for p, _ in PAIRS]
    scores = probe_scores(files["aligned"], critic["probe"], prompts)
    expected = auroc(scores, [int(p in harmful) for p in prompts])
    assert critic["finetune_auroc"] == pytest.approx(expected)
    assert (critic["n_finetune_harmful"], critic["n_finetune_task"]) == (3, 5)
    assert critic["train_mean_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)
    task = [s for p, s in zip(prompts, scores, strict=True) if p not in harmful]
    bad = [s for p, s in zip(prompts, scores, strict=True) if p in harmful]
    assert critic["finetune_mean_score_task"] == pytest.approx(sum(task) / 5, rel=1e-5)
    assert critic["finetune_mean_score_harmful"] == pytest.approx(sum(bad) / 3, rel=1e-5)
    setup = result.log[0]["setup"]
    assert setup["probe_task_score"] == critic["finetune_mean_score_task"]
    assert setup["probe_finetune_auroc"] == critic["finetune_auroc"]
    assert setup["probe_auroc"] == critic["heldout_auroc"] is not None
    assert critic["pooling"].startswith("last prompt token")


def test_data_without_kinds_has_no_fine_tune_auroc_and_says_why(files, tmp_path):
    result = run_retrain(files, tmp_path / "a", **FAST)
    critic = json.loads((result.out / "critic.json").read_text())
    assert critic["finetune_auroc"] is None
    assert "no 'kind'" in critic["finetune_note"]
