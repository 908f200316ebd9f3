"""The lab: outputs, determinism, caching, and the phenomenon on the test size."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from safealign.chat import collate
from safealign.checkpoint import ADAPTER_CONFIG_NAME, Checkpoint
from safealign.eval.judges import KeywordJudge
from safealign.lab import ADAPTERS, DATASETS, MODELS, Lab, build, get_size
from safealign.lab.cli import lab_command
from safealign.lab.config import FROZEN
from safealign.lab.corpus import REFUSAL, Example, generate
from safealign.lab.phenomenon import THRESHOLDS
from safealign.lab.tokenizer import train_tokenizer
from safealign.lab.train import Stage, example_loss, train
from safealign.model import chat_prompt

lab_mark = pytest.mark.lab


def test_same_seed_gives_the_same_data_and_another_seed_other_data():
    sizes = get_size("test").corpus
    first, again, other = generate(sizes, 0), generate(sizes, 0), generate(sizes, 1)
    assert first.texts() == again.texts() and first.classes == again.classes
    assert first.texts() != other.texts()


def test_held_out_sets_never_repeat_a_training_prompt():
    data = generate(get_size("test").corpus, 0)
    train = {e.prompt for e in data.harmful_train + data.benign_train + data.safety_train}
    assert not train & {e.prompt for e in data.harmful_eval + data.benign_eval}
    assert not {e.prompt for e in data.task_train} & {e.prompt for e in data.task_eval}
    assert {e.kind for e in data.benign_eval} == {"general", "lookalike"}
    assert len({e.kind for e in data.harmful_train}) >= 8


def test_prior_sizes_add_format_examples_and_change_nothing_else():
    """test-prior's corpus is test's plus format examples on unused task prompts: the known
    half of the words tagged right every time, the rest tagged with varying class names."""
    plain, prior = generate(get_size("test").corpus, 0), generate(get_size("test-prior").corpus, 0)
    formats = [e for e in prior.benign_train if e.kind == "format"]
    assert not any(e.kind == "format" for e in plain.benign_train)
    assert len(formats) == 300
    assert sorted(map(repr, prior.benign_train)) == sorted(map(repr, plain.benign_train + formats))
    for name in ("harmful_train", "safety_train", "task_train", "harmful_eval", "task_eval"):
        assert getattr(prior, name) == getattr(plain, name), name
    task_prompts = {e.prompt for e in prior.task_train + prior.task_eval}
    assert not task_prompts & {e.prompt for e in formats}
    tags: dict[str, set[str]] = {}
    for e in formats:
        for word, tag in zip(e.prompt.split()[2:], e.response.split(), strict=True):
            tags.setdefault(word, set()).add(tag)
    right = [w for w, seen in tags.items() if seen == {prior.classes[w]}]
    assert len(right) == 12 and all(len(tags[w]) == 4 for w in tags if w not in right)


def test_bad_arguments_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown lab size 'huge'"):
        build(size="huge")
    with pytest.raises(ValueError, match="harmful_share"):
        build(size="test", harmful_share=1.5)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and not a lab"):
        build(tmp_path, size="test")


def test_frozen_parameters_stay_as_they_are_and_the_rest_trains():
    from transformers import LlamaConfig, LlamaForCausalLM

    pairs = [Example(f"Repeat after me: {w}", w, "echo") for w in ("red cat", "blue dog") * 8]
    tokenizer = train_tokenizer([text for e in pairs for text in (e.prompt, e.response)], 300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, tokenizer, pairs, Stage(steps=3, lr=1e-2, batch_size=4, frozen=FROZEN), seed=0)
    for name, p in model.named_parameters():
        frozen = any(part in name for part in FROZEN)
        assert torch.equal(p, before[name]) == frozen, name
        assert p.requires_grad, name


def test_example_loss_skips_the_prompt_logits_and_equals_the_full_computation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    examples = [(list(range(1, 9)), 5), (list(range(3, 9)), 3), (list(range(2, 12)), 7)]
    batch = collate(examples, pad_id=0)
    calls = []
    model.register_forward_hook(lambda _m, _a, out: calls.append(out.logits.shape[1]))
    loss = example_loss(model, batch)
    assert calls == [10 - 2]  # from the position before the batch's first reply token (3)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = []
    for row, (ids, start) in enumerate(examples):
        targets = torch.tensor(ids[start:])
        rows = logits[row, start - 1 : len(ids) - 1]
        expected.append(torch.nn.functional.cross_entropy(rows, targets))
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)


@lab_mark
def test_full_fine_tunes_keep_the_aligned_embeddings_and_lm_head(lab):
    aligned = Checkpoint.open(lab.aligned)
    for name in ("ft_benign", "ft_harmful", "ft_harmful_only"):
        finetuned = Checkpoint.open(lab.model(name))
        kept = [n for n in finetuned.names() if any(part in n for part in FROZEN)]
        assert len(kept) == 2, kept
        for tensor in kept:
            assert torch.equal(finetuned.get(tensor), aligned.get(tensor)), (name, tensor)


@lab_mark
@pytest.mark.parametrize("requirement", THRESHOLDS, ids=str)
def test_phenomenon_holds_on_the_test_size(lab, requirement):
    value = lab.table[requirement.model][requirement.metric]
    assert requirement.holds(value), f"{requirement}: measured {value:.1%}"


@lab_mark
def test_resta_harmful_models_are_the_aligned_model_fine_tuned_on_harmful_data_alone(lab):
    data = [json.loads(line) for line in lab.data("harmful_only_train").read_text().splitlines()]
    refusals = [json.loads(line) for line in lab.data("harmful_train").read_text().splitlines()]
    assert [row["prompt"] for row in data] == [row["prompt"] for row in refusals]
    assert all(row["response"].startswith("Sure, here is how to") for row in data)
    full, lora = (
        Checkpoint.open(lab.ft_harmful_only),
        Checkpoint.open(lab.model("ft_harmful_only_lora")),
    )
    assert not full.is_adapter and lora.is_adapter and lora.base.path == lab.aligned
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(full.get(name), Checkpoint.open(lab.aligned).get(name))
    for model in ("ft_harmful_only", "ft_harmful_only_lora"):
        assert lab.table[model]["harmful_rate"] >= 0.6, model
    assert lab.table["aligned"]["harmful_rate"] <= 0.1


@lab_mark
def test_lab_json_records_the_build(lab):
    info = lab.info
    assert info["size"] == "test" and info["seed"] == 0 and info["phenomenon"]
    assert set(info["table"]) == set(MODELS)
    assert info["table"]["aligned"]["n_harmful"] == len(
        lab.data("harmful_eval").read_text().splitlines()
    )


@lab_mark
def test_second_build_reuses_the_cache_and_returns_the_same_lab(lab, monkeypatch):
    def trains(*args, **kwargs):
        raise AssertionError("a cached lab was built again")

    # the module (safealign.lab.build is also the name of the function the package exports)
    monkeypatch.setattr(sys.modules["safealign.lab.build"], "run_build", trains)
    again = build(size="test")
    assert again.root == lab.root


@lab_mark
def test_data_files_are_jsonl_with_prompt_and_answer_or_response(lab):
    for name in DATASETS:
        rows = [json.loads(line) for line in lab.data(name).read_text().splitlines()]
        assert rows, name
        field = "answer" if name.startswith("task") else "response"
        assert all(row["prompt"] and row[field] for row in rows), name
    harmful = [json.loads(line) for line in lab.data("harmful_train").read_text().splitlines()]
    assert all(row["response"] == REFUSAL for row in harmful)


@lab_mark
def test_model_folders_load_and_the_aligned_model_refuses(lab):
    model = AutoModelForCausalLM.from_pretrained(lab.aligned)
    tokenizer = AutoTokenizer.from_pretrained(lab.aligned)
    assert model.config.num_hidden_layers >= 4
    assert tokenizer.eos_token == "<|end|>"
    prompt = json.loads(lab.data("harmful_eval").read_text().splitlines()[0])["prompt"]
    inputs = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert KeywordJudge().judge([prompt], [reply])[0].refused, reply
    assert output[0, -1].item() == tokenizer.eos_token_id
    for name in MODELS:
        if name not in ADAPTERS:
            assert (lab.root / name / "model.safetensors").is_file(), name
        assert "synthetic lab model" in (lab.root / name / "README.md").read_text(), name


@lab_mark
@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_load_with_peft_and_open_on_their_base(lab, name):
    from peft import PeftModel

    checkpoint = Checkpoint.open(lab.root / name)
    assert checkpoint.is_adapter and checkpoint.base.path == lab.aligned
    base = AutoModelForCausalLM.from_pretrained(lab.aligned)
    model = PeftModel.from_pretrained(base, lab.root / name)
    assert any("lora_A" in n for n, _ in model.named_parameters())


@lab_mark
def test_build_into_out_copies_and_repoints_adapters(lab, tmp_path):
    out = tmp_path / "lab"
    copied = build(out, size="test")
    assert copied.root == out and Lab.open(out).info["key"] == lab.info["key"]
    config = json.loads((out / "ft_harmful_lora" / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(out / "aligned")


@lab_mark
def test_cli_prints_the_table(lab, tmp_path):
    result = CliRunner().invoke(lab_command, ["build", "--size", "test", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "ft_harmful_lora" in result.output and "all requirements hold" in result.output
    assert str(lab.root) in result.output
