"""The merge engine and config on tiny Llama checkpoints: outputs checked against closed forms."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from merge_support import build_tiny_models, read_weights

from safealign.checkpoint import Checkpoint
from safealign.merge import (
    METHODS,
    MergeConfigError,
    MergeSettings,
    load_config,
    plan_merge,
    run_merge,
    safety_config,
)
from safealign.merge.config import layer_position, resolve_value
from safealign.merge.methods import MergeParams
from safealign.merge.plan import tensor_work

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_task_arithmetic_end_to_end(tiny, tmp_path):
    config = write_yaml(
        tmp_path / "ta.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny.aligned),
            "models": [
                {"model": str(tiny.finetuned), "parameters": {"weight": 0.7}},
                {"model": str(tiny.other), "parameters": {"weight": 0.4}},
            ],
            "dtype": "bfloat16",
        },
    )
    result = run_merge(config, MergeSettings(out_shard_size="20KB"), tmp_path / "out")
    a, b, c = (read_weights(p) for p in (tiny.aligned, tiny.finetuned, tiny.other))
    out = read_weights(result.out)
    assert set(out) == set(a)
    for name in a:
        expected = a[name] + 0.7 * (b[name] - a[name]) + 0.4 * (c[name] - a[name])
        torch.testing.assert_close(out[name], expected.bfloat16().float(), rtol=8e-3, atol=1e-5)
    files = sorted(p.name for p in result.out.iterdir())
    assert (
        "model.safetensors.index.json" in files and len(list(result.out.glob("*.safetensors"))) > 1
    )
    assert json.loads((result.out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "task_arithmetic" in (result.out / "README.md").read_text()
    report = json.loads((result.out / "merge_report.json").read_text())
    assert report["config"]["models"][0]["parameters"] == {"weight": 0.7}


def test_inputs_read_lazily_by_name_and_streamed(tiny, tmp_path, monkeypatch):
    reads = []
    original = Checkpoint.get

    def counting(self, name, dtype=None):
        reads.append((self.path.name, name))
        return original(self, name, dtype)

    monkeypatch.setattr(Checkpoint, "get", counting)
    config = {
        "merge_method": "ties",
        "base_model": str(tiny.aligned),
        "models": [{"model": str(tiny.finetuned)}, {"model": str(tiny.other)}],
        "parameters": {"weight": 1.0, "density": 0.5},
    }
    run_merge(config, None, tmp_path / "out")
    names = Checkpoint.open(tiny.aligned).names()
    # TIES streams over the models twice (sign election, then agreeing entries): each model's
    # tensor is read twice, the base's once; nothing else is read.
    expected = [("aligned", n) for n in names]
    expected += [(m, n) for m in ("finetuned", "other") for n in names] * 2
    assert sorted(reads) == sorted(expected)
    reads.clear()
    config["merge_method"] = "task_arithmetic"
    run_merge(config, None, tmp_path / "out2")
    assert sorted(reads) == sorted((m, n) for m in ("aligned", "finetuned", "other") for n in names)


def test_slerp_gradient_and_filters_follow_mergekit(tiny, tmp_path):
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]
    config = {
        "merge_method": "slerp",
        "base_model": str(tiny.aligned),
        "models": [{"model": str(tiny.aligned)}, {"model": str(tiny.finetuned)}],
        "parameters": {"t": t},
    }
    result = run_merge(config, None, tmp_path / "out")
    a, b, out = (read_weights(p) for p in (tiny.aligned, tiny.finetuned, result.out))
    slerp = METHODS.create("slerp")
    for name, t_value in [
        ("model.layers.0.self_attn.k_proj.weight", 0.0),
        ("model.layers.1.self_attn.k_proj.weight", 0.5),
        ("model.layers.2.self_attn.k_proj.weight", 1.0),
        ("model.layers.1.mlp.up_proj.weight", 0.25),
    ]:
        expected = slerp.merge(name, {"b": b[name]}, a[name], MergeParams({"t": t_value}))
        torch.testing.assert_close(out[name], expected)
    assert layer_position("model.layers.1.mlp.up_proj.weight", 3) == 0.5
    assert resolve_value([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)


def test_config_validation_lists_every_problem(tiny, tmp_path):
    config = write_yaml(
        tmp_path / "bad.yaml",
        {
            "merge_method": "ties",
            "base_model": str(tiny.aligned),
            "models": [
                {"model": str(tmp_path / "missing")},
                {"model": str(tiny.finetuned), "parameters": {"density": 1.5, "wieght": 1}},
            ],
            "parameters": {"normalize": "yes"},
            "extra_key": 1,
        },
    )
    with pytest.raises(MergeConfigError) as err:
        load_config(config)
    assert "unknown key 'extra_key'" in str(err.value)
    config.write_text(config.read_text().replace("extra_key: 1\n", ""))
    with pytest.raises(MergeConfigError) as err:
        load_config(config)
    lines = str(err.value).splitlines()
    assert any("model folder not found" in line and "missing" in line for line in lines)
    assert any("density: must be a number in (0, 1]" in line for line in lines)
    assert any("unknown parameter 'wieght'" in line for line in lines)
    assert any("normalize: must be true or false" in line for line in lines)
    assert any("parameter weight is required" in line for line in lines)
    assert len(lines) >= 5


def test_method_requirements_are_checked(tiny):
    with pytest.raises(MergeConfigError, match="parameter t is required"):
        load_config(
            {"merge_method": "slerp", "base_model": str(tiny.aligned), "models": [str(tiny.lora)]}
        )
    with pytest.raises(MergeConfigError, match="safemerge needs --unaligned"):
        safety_config("safemerge", aligned=tiny.aligned, finetuned=tiny.lora)
    with pytest.raises(MergeConfigError, match="resta needs --harmful-model"):
        safety_config("resta", aligned=tiny.aligned, finetuned=tiny.lora)
    with pytest.raises(MergeConfigError, match="resta does not take --unaligned"):
        safety_config(
            "resta", aligned=tiny.aligned, finetuned=tiny.lora, harmful_model=tiny.other,
            unaligned=tiny.unaligned,
        )  # fmt: skip
    with pytest.raises(MergeConfigError, match="slices"):
        load_config({"merge_method": "linear", "slices": [], "models": [str(tiny.aligned)]})


def safemerge_of_loras(tiny, **parameters):
    """SafeMERGE of the fine-tuning LoRA with the safety LoRA, both on the aligned model."""
    roles = {"unaligned": tiny.unaligned, "finetuned": tiny.lora, "safety": tiny.safety_lora}
    return safety_config("safemerge", aligned=tiny.aligned, parameters=parameters, **roles)


def test_plan_reads_inputs_as_the_method_declares(tiny):
    """LoRAs on the aligned model are read as factors only in the roles the method names;
    the output kind, tokenizer source and per-tensor work follow from that, once."""
    plan = plan_merge(safemerge_of_loras(tiny))
    assert plan.factors == {"finetuned", "safety"} and plan.output == "adapter"
    assert plan.source.path == tiny.lora and plan.base.path == tiny.aligned
    work = tensor_work(plan, {Q0})
    assert [w.name for w in work] == Checkpoint.open(tiny.lora).lora_targets()
    assert [w.name for w in work if w.params.selected] == [Q0]
    dense = safety_config(
        "safemerge", aligned=tiny.aligned, unaligned=tiny.unaligned, finetuned=tiny.finetuned
    )
    plan = plan_merge(dense)
    assert plan.factors == frozenset() and plan.output == "model"
    with pytest.raises(MergeConfigError, match="adapter output needs"):
        plan_merge(dense, MergeSettings(output_type="adapter"))
    ties = {
        "merge_method": "ties",
        "base_model": str(tiny.aligned),
        "models": [{"model": str(tiny.lora)}, {"model": str(tiny.finetuned)}],
        "parameters": {"weight": 1.0},
        "out_dtype": "bfloat16",
    }
    plan = plan_merge(ties)
    assert set(plan.inputs) == {str(tiny.aligned), str(tiny.lora), str(tiny.finetuned)}
    assert plan.factors == frozenset() and plan.output == "model"
    work = tensor_work(plan, set())
    assert [w.name for w in work] == Checkpoint.open(tiny.aligned).names()
    assert {w.dtype for w in work} == {torch.bfloat16}


def dense_rho(a, u, update):
    v = a - u
    c_update = v @ v.T @ update / torch.linalg.matrix_norm(v)
    return torch.nn.functional.cosine_similarity(c_update.flatten(), update.flatten(), 0).item()


def test_safemerge_peft_linear_refuses_loras_of_two_ranks_in_one_line(tiny, tmp_path):
    with pytest.raises(ValueError, match="one rank .* got ranks \\[2, 4\\]: use combination=exact"):
        run_merge(safemerge_of_loras(tiny, tau=2.0), None, tmp_path / "out")


def test_safemerge_lora_in_lora_out_equals_dense_merge(tiny, tmp_path):
    rhos = {}
    a, u = read_weights(tiny.aligned), read_weights(tiny.unaligned)
    lora = Checkpoint.open(tiny.lora)
    for name in lora.lora_targets():
        rhos[name] = dense_rho(a[name], u[name], lora.lora_factors(name).dense())
    ordered = sorted(rhos.values())
    half = len(ordered) // 2
    tau = (ordered[half - 1] + ordered[half]) / 2  # selects half the layers
    config = safemerge_of_loras(tiny, tau=tau, combination="exact")  # LoRAs of ranks 4 and 2
    adapter = run_merge(config, None, tmp_path / "adapter")
    dense = run_merge(config, MergeSettings(output_type="model"), tmp_path / "dense")
    assert adapter.report["output"] == "adapter" and dense.report["output"] == "model"
    rows = {row["name"]: row for row in adapter.report["layers"]}
    assert set(rows) == set(rhos)
    for name, rho in rhos.items():
        assert rows[name]["rho"] == pytest.approx(rho, abs=1e-4)
        assert rows[name]["selected"] == (rho < tau)
    assert 0 < adapter.report["layers_selected"] < len(rhos)

    merged = Checkpoint.open(adapter.out, base=tiny.aligned)
    dense_out = read_weights(dense.out)
    safety = Checkpoint.open(tiny.safety_lora)
    for name in a:
        torch.testing.assert_close(merged.get(name), dense_out[name], rtol=1e-4, atol=1e-5)
        ft = lora.get(name)
        if rows.get(name, {}).get("selected"):
            expected = 0.8 * ft + 0.2 * safety.get(name)
        else:
            expected = ft
        torch.testing.assert_close(dense_out[name], expected, rtol=1e-4, atol=1e-5)
    assert (adapter.out / "merge_report.json").exists()


def test_safe_lora_lowest_k_projects_k_layers(tiny, tmp_path):
    config = safety_config(
        "safe_lora",
        aligned=tiny.aligned,
        unaligned=tiny.unaligned,
        finetuned=tiny.lora,
        parameters={"select": "lowest", "k": 2},
    )
    result = run_merge(config, None, tmp_path / "out")
    selected = [row for row in result.report["layers"] if row["selected"]]
    lowest = sorted(row["rho"] for row in result.report["layers"])[:2]
    assert sorted(row["rho"] for row in selected) == lowest
    merged = Checkpoint.open(result.out, base=tiny.aligned)
    a, u = read_weights(tiny.aligned), read_weights(tiny.unaligned)
    lora = Checkpoint.open(tiny.lora)
    name = selected[0]["name"]
    v = a[name] - u[name]
    expected = a[name] + v @ v.T @ lora.lora_factors(name).dense() / torch.linalg.matrix_norm(v)
    torch.testing.assert_close(merged.get(name), expected, rtol=1e-4, atol=1e-5)
    assert merged.lora_factors(name).A.shape == lora.lora_factors(name).A.shape


def test_resta_on_dense_models(tiny, tmp_path):
    config = safety_config(
        "resta",
        aligned=tiny.aligned,
        harmful_model=tiny.other,
        finetuned=tiny.finetuned,
        parameters={"beta": 0.3},
    )
    result = run_merge(config, None, tmp_path / "out")
    a, h, b = (read_weights(p) for p in (tiny.aligned, tiny.other, tiny.finetuned))
    out = read_weights(result.out)
    for name in a:
        torch.testing.assert_close(out[name], b[name] + 0.3 * (a[name] - h[name]))


@pytest.mark.parametrize(
    "name", ["merge_ties.yaml", "merge_safemerge.yaml", "merge_safe_lora.yaml"]
)
def test_example_configs_fail_only_on_missing_model_folders(name):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / name
    with pytest.raises(MergeConfigError) as err:
        load_config(example)
    assert all("model folder not found" in line for line in str(err.value).splitlines())


def test_a_loaded_config_is_frozen_and_knows_its_folder(tiny, tmp_path):
    """A run never changes the config it was given: assigning a field raises."""
    path = write_yaml(
        tmp_path / "linear.yaml",
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tiny.aligned), "parameters": {"weight": 0.5}},
                {"model": str(tiny.finetuned), "parameters": {"weight": 0.5}},
            ],
        },
    )
    config = load_config(path)
    assert config.source_path == tmp_path.resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.merge_method = "ties"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models[0].model = str(tiny.other)
