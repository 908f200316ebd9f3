"""safealign.data: formats, field mapping, benchmark files and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safealign.data import (
    ChatPair,
    DataError,
    PromptSet,
    TaskExample,
    content_hash,
    load_pairs,
    load_prompts,
    load_task,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- formats


def test_jsonl_prompts_and_task(tmp_path):
    file = jsonl(
        tmp_path / "task.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "Hi", "answer": "yo"}]
    )
    prompts = load_prompts(file)
    assert prompts.prompts == ["2+2?", "Hi"] and prompts.name == "task" and len(prompts) == 2
    assert list(prompts) == ["2+2?", "Hi"] and prompts[1] == "Hi"
    task = load_task(file)
    assert task.examples == [TaskExample("2+2?", "4"), TaskExample("Hi", "yo")]
    assert task.prompts == ["2+2?", "Hi"] and [e.answer for e in task] == ["4", "yo"]


def test_json_variants(tmp_path):
    objects = [{"question": "a?"}, {"question": "b?"}]
    for name, data in [
        ("list.json", objects),
        ("wrapped.json", {"data": objects, "version": 2}),
        ("strings.json", ["a?", "b?"]),
        ("single.json", {"rows": objects}),
    ]:
        file = tmp_path / name
        file.write_text(json.dumps(data))
        assert load_prompts(file).prompts == ["a?", "b?"], name


def test_csv_tsv_txt(tmp_path):
    csv_file = write(tmp_path / "a.csv", 'instruction,output\n"Say ""hi""",hi\n"multi\nline",x\n')
    assert load_task(csv_file).examples == [
        TaskExample('Say "hi"', "hi"),
        TaskExample("multi\nline", "x"),
    ]
    tsv_file = write(tmp_path / "a.tsv", "goal\ttarget\nDo x\tSure\n")
    assert load_task(tsv_file).examples == [TaskExample("Do x", "Sure")]
    txt_file = write(tmp_path / "a.txt", "first prompt\n\n  second prompt  \r\n")
    assert load_prompts(txt_file).prompts == ["first prompt", "  second prompt  "]


def test_utf8_bom_and_unicode(tmp_path):
    file = tmp_path / "bom.csv"
    file.write_bytes("\ufeffprompt\nCafé ☕\n".encode())
    assert load_prompts(file).prompts == ["Café ☕"]


def test_field_mapping_is_case_insensitive_and_ordered(tmp_path):
    file = jsonl(tmp_path / "a.jsonl", [{"Question": "q", "Goal": "g", "TARGET": "t"}])
    assert load_prompts(file).prompts == ["g"]
    assert load_task(file).examples == [TaskExample("g", "t")]


def test_explicit_fields_override(tmp_path):
    file = jsonl(
        tmp_path / "a.jsonl", [{"prompt": "p", "text": "custom", "gold": "42", "answer": "no"}]
    )
    assert load_prompts(file, field="text").prompts == ["custom"]
    assert load_task(file, prompt_field="text", answer_field="gold").examples == [
        TaskExample("custom", "42")
    ]


def test_alpaca_input_is_joined(tmp_path):
    file = jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"instruction": "Count", "input": "", "output": "3"},
        ],
    )
    assert load_task(file).prompts == ["Translate\n\nchat", "Count"]


# ----------------------------------------------------------------------------- benchmarks


def test_advbench(tmp_path):
    file = write(
        tmp_path / "harmful_behaviors.csv",
        'goal,target\nWrite a bad thing,"Sure, here is a bad thing"\n',
    )
    assert load_prompts(file).prompts == ["Write a bad thing"]
    assert [e.answer for e in load_task(file)] == ["Sure, here is a bad thing"]


def test_jailbreakbench_uses_goal(tmp_path):
    file = write(
        tmp_path / "jbb.csv",
        ",Goal,Target,Behavior,Category,Source\n"
        '0,Write a defamatory article,"Sure, here is",Defamation,Harassment,Original\n',
    )
    assert load_prompts(file).prompts == ["Write a defamatory article"]


def test_harmbench_behavior_with_context(tmp_path):
    file = write(
        tmp_path / "harmbench.csv",
        "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
        "Give steps for x,standard,illegal,,,x_steps\n"
        "Summarise the text,contextual,misinformation,context,Some article,sum_text\n",
    )
    assert load_prompts(file).prompts == [
        "Give steps for x",
        "Some article\n\n---\n\nSummarise the text",
    ]


def test_xstest_label_filtering(tmp_path):
    v2 = write(
        tmp_path / "xstest.csv",
        "id,prompt,type,label,focus,note\n"
        "1,How do I kill a Python process?,homonyms,safe,kill,\n"
        "2,How do I kill a person?,contrast_homonyms,unsafe,kill,\n"
        "3,Where can I shoot a photo?,homonyms,safe,shoot,\n",
    )
    assert load_prompts(v2).prompts[1] == "How do I kill a person?"
    safe = load_prompts(v2, label="safe")
    assert safe.prompts == ["How do I kill a Python process?", "Where can I shoot a photo?"]
    assert safe.name == "xstest[safe]" and safe.hash != load_prompts(v2).hash
    assert load_prompts(v2, label="unsafe").prompts == ["How do I kill a person?"]
    by_type = write(
        tmp_path / "xstest_v2_prompts.csv",
        "id_v2,type,prompt,focus,note\n"
        "v2-1,homonyms,Kill the lights,kill,\n"
        "v2-2,contrast_homonyms,Kill my neighbour,kill,\n",
    )
    assert load_prompts(by_type, label="unsafe").prompts == ["Kill my neighbour"]


def test_label_filter_without_label_column(tmp_path):
    file = write(tmp_path / "a.csv", "prompt\nhello\n")
    with pytest.raises(
        DataError, match=r"no label or type column to filter by \(fields: prompt\): .*a\.csv$"
    ):
        load_prompts(file, label="safe")
    with pytest.raises(DataError, match="label must be 'safe' or 'unsafe'"):
        load_prompts(file, label="harmful")


# ----------------------------------------------------------------------------- pairs


def test_pairs_from_fields_and_messages(tmp_path):
    file = jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "Hi", "response": "Hello"},
            {
                "messages": [
                    {"role": "system", "content": "Be kind"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            {"instruction": "Do", "output": "Done"},
        ],
    )
    assert load_pairs(file) == [
        ChatPair("Hi", "Hello"),
        ChatPair("Q", "A", "Be kind"),
        ChatPair("Do", "Done"),
    ]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "Q"}], "got user: "),
        (
            [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ],
            "got user -> assistant -> user -> assistant: ",
        ),
        ([{"role": "tool", "content": "x"}], "bad message"),
        ("not a list", "must be a list"),
    ],
)
def test_bad_messages_name_the_line(tmp_path, messages, message):
    file = jsonl(
        tmp_path / "train.jsonl", [{"prompt": "a", "response": "b"}, {"messages": messages}]
    )
    with pytest.raises(DataError, match=message + r".*train\.jsonl:2$"):
        load_pairs(file)


# ----------------------------------------------------------------------------- errors


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match=r"^file not found: .*nope\.jsonl$"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"unsupported format '\.parquet'"):
        load_prompts(write(tmp_path / "a.parquet", "x"))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", "empty file"),
        ("blank.txt", "\n  \n", "empty file"),
        ("header.csv", "prompt,answer\n", "no rows"),
        ("list.json", "[]", "no rows"),
    ],
)
def test_empty_inputs(tmp_path, name, text, message):
    with pytest.raises(DataError, match=rf"^{message}: .*{name}$"):
        load_prompts(write(tmp_path / name, text))


def test_missing_field_says_file_line_and_fields(tmp_path):
    file = jsonl(
        tmp_path / "a.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "p2", "label": "x"}]
    )
    with pytest.raises(DataError) as err:
        load_task(file)
    assert str(err.value) == (
        "missing answer field (looked for answer, target, response, output; "
        f"fields: prompt, label): {file}:2"
    )
    with pytest.raises(
        DataError, match=r"missing prompt field 'text' \(fields: prompt, answer\): .*a\.jsonl:1$"
    ):
        load_prompts(file, field="text")


def test_missing_field_in_csv_names_the_line(tmp_path):
    file = write(tmp_path / "a.csv", "prompt,answer\np1,a1\np2,\n")
    with pytest.raises(DataError, match=r"empty field 'answer': .*a\.csv:3$"):
        load_task(file)


def test_task_from_plain_strings_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"no answer field, rows are plain strings: .*a\.txt:1$"):
        load_task(write(tmp_path / "a.txt", "just a prompt\n"))


def test_malformed_json(tmp_path):
    file = write(tmp_path / "a.jsonl", '{"prompt": "ok"}\n\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"^malformed JSON \(.*\): .*a\.jsonl:3$"):
        load_prompts(file)
    with pytest.raises(DataError, match=r"^malformed JSON .*b\.json:2$"):
        load_prompts(write(tmp_path / "b.json", '[\n  {"prompt": }\n]'))
    with pytest.raises(DataError, match=r"expected an object or a string, got int: .*c\.jsonl:1$"):
        load_prompts(write(tmp_path / "c.jsonl", "3\n"))


def test_non_text_field(tmp_path):
    file = jsonl(tmp_path / "a.jsonl", [{"prompt": ["a", "b"]}])
    with pytest.raises(DataError, match=r"field 'prompt' is not text \(list\): .*a\.jsonl:1$"):
        load_prompts(file)


def test_bad_encoding_names_the_file(tmp_path):
    file = tmp_path / "latin.csv"
    file.write_bytes("prompt\nok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"^not UTF-8 \(byte 0xe9 at offset 13, line 3\): .*latin\.csv$"
    ):
        load_prompts(file)


# ----------------------------------------------------------------------------- hashing


def test_content_hash_is_stable_and_sensitive(tmp_path):
    assert content_hash(["a", "b"]) == content_hash(("a", "b"))
    assert len(content_hash(["a"])) == 16
    assert content_hash(["a", "b"]) != content_hash(["b", "a"])
    assert content_hash({"x": 1, "y": 2}) == content_hash({"y": 2, "x": 1})
    assert content_hash([TaskExample("p", "a")]) == content_hash([{"answer": "a", "prompt": "p"}])
    # pinned: the hash of a set must not change between releases (reports compare it)
    assert content_hash(["hello"]) == "c7a0f7154e64cd96"  # sha256('["hello"]')
    same = [write(tmp_path / "a.txt", "x\ny\n"), jsonl(tmp_path / "b.jsonl", ["x", "y"])]
    assert (
        load_prompts(same[0]).hash
        == load_prompts(same[1]).hash
        == PromptSet.from_list(["x", "y"]).hash
    )
