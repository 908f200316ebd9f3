"""The training loop on a tiny random Llama: first-step KL, accumulation, resume, outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from retrain_support import adapter_weights, run_retrain, setup_files, tiny_model_folder
from transformers import AutoModelForCausalLM

FAST = {"epochs": 2, "grad_batch_size": 2, "lr": 1e-2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return setup_files(tmp_path_factory.mktemp("retrain"))


def test_kl_is_exactly_zero_at_the_first_step_of_a_fresh_lora(files, tmp_path):
    result = run_retrain(files, tmp_path / "out", regularizer="kl", **FAST)
    assert result.steps[0]["kl"] == 0.0
    assert result.steps[-1]["kl"] > 0.0
    assert result.metrics["reference_bytes"] == 0  # the adapter is switched off: no copy


def test_token_wise_log_ratio_is_exactly_zero_at_the_first_step_of_a_fresh_lora(files, tmp_path):
    spec = "kl:form=token-wise"
    result = run_retrain(files, tmp_path / "out", regularizer=spec, **FAST)
    assert result.steps[0]["log_ratio"] == 0.0
    assert result.steps[-1]["log_ratio"] > 0.0  # the trained tokens gained on the reference


def test_epoch_kl_is_exactly_zero_at_the_first_step_of_each_epoch(files, tmp_path):
    """Each epoch's reference is the model as the previous epoch ended."""
    result = run_retrain(files, tmp_path / "out", regularizer="epoch-kl", **(FAST | {"epochs": 3}))
    epochs = [row["epoch"] for row in result.steps]
    first = [i for i, epoch in enumerate(epochs) if i == 0 or epoch != epochs[i - 1]]
    assert len(first) == 3 and len(epochs) == 12  # 4 steps per epoch
    assert [result.steps[i]["kl"] for i in first] == [0.0] * 3
    assert all(row["kl"] > 0.0 for i, row in enumerate(result.steps) if i not in first)


def test_gradient_accumulation_2x1_equals_1x2(files, tmp_path):
    settings = FAST | {"epochs": 1, "regularizer": "kl"}
    one = run_retrain(files, tmp_path / "a", **(settings | {"grad_batch_size": 2}))
    two = run_retrain(files, tmp_path / "b", **(settings | {"grad_batch_size": 1, "grad_accum": 2}))
    a, b = adapter_weights(one.out), adapter_weights(two.out)
    assert [r["loss"] for r in one.steps] == pytest.approx([r["loss"] for r in two.steps], rel=1e-5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("regularizer", ["kl", "epoch-kl", "ema", "interleave"])
def test_resume_after_k_steps_is_bitwise_the_uninterrupted_run(files, tmp_path, regularizer):
    if regularizer == "interleave":  # share 0.2: 2 anchors in an epoch of 4 steps; 5 is mid-epoch
        misaligned = tiny_model_folder(tmp_path / "misaligned", seed=1)
        regularizer = f"interleave:share=0.2,misaligned={misaligned}"
    settings = FAST | {"regularizer": regularizer, "epochs": 3}
    full = run_retrain(files, tmp_path / "full", save_every=5, **settings)
    partial = tmp_path / "partial.checkpoints"
    partial.mkdir()
    shutil.copytree(tmp_path / "full.checkpoints" / "step-000005", partial / "step-000005")
    said = []
    resumed = run_retrain(
        files,
        tmp_path / "resumed",
        resume=True,
        checkpoint_dir=str(partial),
        progress=said.append,
        **settings,
    )
    assert any(line.endswith("(step 5)") for line in said)
    a, b = adapter_weights(full.out), adapter_weights(resumed.out)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["loss"] for r in resumed.steps] == [r["loss"] for r in full.steps]


def test_adapter_output_loads_with_peft_and_carries_card_and_log(files, tmp_path):
    from peft import PeftModel

    result = run_retrain(files, tmp_path / "out", regularizer="sft", **FAST)
    base = AutoModelForCausalLM.from_pretrained(files["aligned"])
    model = PeftModel.from_pretrained(base, str(result.out))
    assert any("lora_B" in name for name, _ in model.named_parameters())
    rows = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows)))  # 0: plan and setup
    assert "retrain" in (result.out / "README.md").read_text()


@pytest.mark.parametrize("mode", [{"full": True}, {"merge": True}])
def test_full_and_merged_outputs_load_with_auto_model(files, tmp_path, mode):
    result = run_retrain(files, tmp_path / "out", regularizer="kl", **FAST, **mode)
    model = AutoModelForCausalLM.from_pretrained(str(result.out))
    reference = AutoModelForCausalLM.from_pretrained(files["aligned"])
    moved = [not torch.equal(p, reference.state_dict()[n]) for n, p in model.state_dict().items()]
    assert any(moved)
    if mode.get("full"):
        assert result.metrics["reference_bytes"] > 0  # the frozen copy


def test_dry_run_trains_and_writes_nothing(files, tmp_path):
    result = run_retrain(files, tmp_path / "out", dry_run=True)
    assert result.out is None and result.plan["steps"] == 3  # 3 epochs of one batch of 8
    assert not (tmp_path / "out").exists()


def test_continuing_an_adapter_uses_its_frozen_clone_as_reference(files, tmp_path):
    first = run_retrain(files, tmp_path / "first", regularizer="sft", **FAST)
    again = run_retrain(
        files | {"adapter": str(first.out)}, tmp_path / "again", regularizer="kl", **FAST
    )
    assert again.plan["reference"] == "snapshot"
    assert again.plan["kl_direction"] == "reverse"  # kl's default, recorded in log and card
    assert "KL direction reverse" in (again.out / "README.md").read_text()
    assert again.steps[0]["kl"] == 0.0  # the clone, not the bare base (which differs from it)
    adapter_bytes = sum(t.numel() * 4 for t in adapter_weights(first.out).values())
    assert again.metrics["reference_bytes"] == adapter_bytes


def test_text_data_trains_every_token(files, tmp_path):
    from safealign.retrain.build import load_tokenizer
    from safealign.retrain.data import load_examples
    from safealign.retrain.settings import RetrainInputs

    path = tmp_path / "text.txt"
    path.write_text("Sure here is how to bake a cake .\nwrite a poem .\n")
    tokenizer = load_tokenizer(RetrainInputs(files["aligned"], str(path)))
    examples = load_examples(tokenizer, path, text=True, max_length=64).examples
    assert [start for _, start in examples] == [0, 0]
    files = files | {"data": str(path)}
    result = run_retrain(files, tmp_path / "out", text=True, regularizer="sft", **FAST)
    assert result.steps[0]["tokens"] == sum(len(ids) - 1 for ids, _ in examples)


def test_judge_critic_and_periodic_evaluation(files, tmp_path):
    result = run_retrain(
        files,
        tmp_path / "out",
        regularizer="adaptive-kl:critic=judge:keyword",
        eval_every=2,
        **(FAST | {"epochs": 1}),
    )
    # At the first step the model still equals its reference, so its replies are the
    # reference's: no rise in harm, s = 0 on every example, beta its minimum.
    assert result.steps[0]["beta"] == pytest.approx(0.1)
    evaluated = [row["eval"] for row in result.steps if "eval" in row]
    assert len(evaluated) == 2 and evaluated[0]["harmful_rate"] == 1.0


DISTRIBUTED = """
import sys
from safealign.retrain import RetrainInputs, RetrainSettings, retrain
aligned, data, out = sys.argv[1:4]
settings = RetrainSettings(regularizer="kl", epochs=2, grad_batch_size=1, lr=1e-2, cpu=True)
retrain(RetrainInputs(aligned, data), settings, out)
"""


def test_two_processes_of_one_example_equal_one_process_of_two(files, tmp_path):
    """DDP through accelerate (gloo on CPU): the loss is normalised by the tokens of both
    processes, so 2 processes x batch 1 train as 1 process x batch 2."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(DISTRIBUTED)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "two"
    subprocess.run([*launch, str(script), files["aligned"], files["data"], str(out)], check=True)
    one = run_retrain(files, tmp_path / "one", regularizer="kl", **FAST)
    a, b = adapter_weights(one.out), adapter_weights(out)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
