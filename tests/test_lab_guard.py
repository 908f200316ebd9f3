"""The lab's prompts for recover's over-refusal guard, and compare feeding them to recover only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import safealign.compare.methods as methods
from safealign.compare.methods import parse_method
from safealign.compare.settings import CompareInputs
from safealign.lab.compare import lab_inputs
from safealign.lab.corpus import EVAL_TEMPLATES, TRAIN_TEMPLATES
from safealign.lab.guard import GUARD_PROMPTS, guard_prompts


def _template(prompt: str, templates) -> bool:
    """Whether ``prompt`` is one of ``templates`` filled in."""
    for template in templates:
        head, _, tail = template.partition("{x}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head + tail):
            return True
    return False


def test_tiny_lab_guard_prompts_are_new_prompts_in_held_out_templates(lab):
    prompts = guard_prompts(lab)
    assert len(prompts) == GUARD_PROMPTS == len(set(prompts))
    data = Path(lab.data("benign_eval")).parent
    seen = {json.loads(line)["prompt"] for path in data.glob("*.jsonl") for line in open(path)}
    assert not set(prompts) & seen  # none is a prompt of the lab's data, benign_eval included
    assert all(_template(p, EVAL_TEMPLATES) for p in prompts)
    assert not any(_template(p, TRAIN_TEMPLATES) for p in prompts)
    assert guard_prompts(lab) == prompts  # the same every call


def test_the_real_lab_guard_is_its_benign_validation_split(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"benign {i}", "kind": "ordinary"} for i in range(70)]
    (data / "benign_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from safealign.lab.layout import Lab

    assert guard_prompts(Lab(tmp_path)) == [f"benign {i}" for i in range(GUARD_PROMPTS)]


def test_the_lab_feeds_the_guard_to_recover_and_look_alikes_to_the_others(lab):
    inputs = lab_inputs(lab)
    assert inputs.guard == guard_prompts(lab)
    assert set(inputs.benign_train) <= set(lab.prompts("safety_train", kind="lookalike"))


@pytest.mark.parametrize(
    ("guard", "benign_train", "expected"),
    [(["g"], ["t"], ["g"]), (None, ["t"], ["t"]), (None, None, None)],
)
def test_recover_takes_the_guard_else_benign_train(
    monkeypatch, tmp_path, guard, benign_train, expected
):
    fed = []

    def fake_recover(given, settings, out):
        fed.append(given.benign)
        raise RuntimeError("stop")

    monkeypatch.setattr(methods, "recover", fake_recover)
    inputs = CompareInputs(
        tmp_path, tmp_path, harmful=["h"], guard=guard, benign_train=benign_train
    )
    with pytest.raises(RuntimeError, match="stop"):
        methods.FAMILIES.get("recover").run(parse_method("recover"), inputs, tmp_path / "out")
    assert fed == [expected]
