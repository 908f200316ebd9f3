"""Hub ids as checkpoints, resolved from a hand-made offline hub cache (no network).

The cache has the layout ``huggingface_hub`` writes: ``models--org--name/`` with ``refs/<ref>``
holding a commit, ``snapshots/<commit>/`` of relative symlinks into ``blobs/``. ``HF_HUB_CACHE``
points at it and ``HF_HUB_OFFLINE`` is set, both in the environment (for subprocesses) and in
``huggingface_hub.constants`` (read once, at import, in this process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hub_support import add_repo, commit_of
from huggingface_hub import constants
from merge_support import read_weights
from recover_support import HARMFUL, make_adapter, make_pair
from retrain_support import pairs_file

from safealign.checkpoint import ADAPTER_CONFIG_NAME, Checkpoint, CheckpointError
from safealign.checkpoint import hub as hub_module
from safealign.checkpoint.hub import resolve_checkpoint
from safealign.compare.settings import CompareInputs, check_inputs
from safealign.eval import Evaluator
from safealign.eval.cache import folder_fingerprint
from safealign.eval.cli import eval_command
from safealign.merge.cli import merge_command
from safealign.merge.config import MergeConfig, resolve_path
from safealign.model import load_model
from safealign.recover.cli import recover_command
from safealign.retrain.cli import retrain_command
from safealign.settings import SettingsError

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local models and the offline cache holding them as ``org/aligned`` (``@v2``: the
    fine-tuned weights), ``org/finetuned``, ``org/lora`` (its base named ``org/aligned``) and
    ``org/tok`` (the aligned model, its tokenizer's ``model_max_length`` 77)."""
    root = tmp_path_factory.mktemp("hub")
    aligned, finetuned = make_pair(root)
    lora = make_adapter(root, aligned)
    config = json.loads((lora / ADAPTER_CONFIG_NAME).read_text())
    (lora / ADAPTER_CONFIG_NAME).write_text(
        json.dumps(config | {"base_model_name_or_path": "org/aligned"})
    )
    tok = shutil.copytree(aligned, root / "tok")  # the aligned model with its own tokenizer
    tok_config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps(tok_config | {"model_max_length": 77}))
    cache = root / "cache"
    snapshots = {
        "org/aligned": add_repo(cache, "org/aligned", aligned, commit_of("aligned")),
        "org/aligned@v2": add_repo(cache, "org/aligned", finetuned, commit_of("v2"), ("v2",)),
        "org/finetuned": add_repo(cache, "org/finetuned", finetuned, commit_of("finetuned")),
        "org/lora": add_repo(cache, "org/lora", lora, commit_of("lora")),
        "org/tok": add_repo(cache, "org/tok", tok, commit_of("tok")),
    }
    return {"aligned": aligned, "finetuned": finetuned, "lora": lora, "cache": cache} | snapshots


@pytest.fixture(autouse=True)
def offline(hub, monkeypatch):
    hub_module._snapshot.cache_clear()  # each test resolves afresh (stand-in hubs differ)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_ids_and_revisions_resolve_to_their_snapshots(hub):
    assert resolve_checkpoint("org/aligned") == hub["org/aligned"]
    assert resolve_checkpoint("org/aligned@v2") == hub["org/aligned@v2"]
    assert resolve_checkpoint("org/aligned", revision="v2") == hub["org/aligned@v2"]
    assert resolve_checkpoint(f"org/aligned@{commit_of('aligned')}") == hub["org/aligned"]
    assert resolve_checkpoint(Path("org/lora")) == hub["org/lora"]  # the CLI hands over Paths
    assert resolve_checkpoint(hub["aligned"]) == hub["aligned"]  # local folders unchanged


def test_unresolvable_references_are_one_line_errors(hub, tmp_path):
    missing = "not a local folder, and not in the hub cache (HF_HUB_OFFLINE is set)"
    for ref, message in [
        ("org/missing", f"org/missing: {missing}"),
        ("org/aligned@v3", f"org/aligned@v3: {missing}"),
        (str(tmp_path / "nowhere"), f"checkpoint not found: {tmp_path / 'nowhere'}"),
        ("not/a/hub/id", f"checkpoint not found: {Path('not/a/hub/id').resolve()}"),
    ]:
        with pytest.raises(CheckpointError) as err:
            resolve_checkpoint(ref)
        assert str(err.value) == message
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("org/aligned@v2", revision="main")
    assert str(err.value) == "org/aligned@v2: revision v2 in the id, but revision=main given"


def test_the_environment_alone_selects_cache_and_offline_mode(hub):
    code = (
        "from safealign.checkpoint.hub import resolve_checkpoint as r; print(r('org/aligned@v2'))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == str(hub["org/aligned@v2"])


def test_checkpoints_open_by_id_and_an_adapter_finds_its_hub_base(hub, tmp_path):
    lora = Checkpoint.open("org/lora")
    assert lora.is_adapter and lora.path == hub["org/lora"].resolve()
    assert lora.base.path == hub["org/aligned"].resolve()
    local = Checkpoint.open(hub["lora"], base=hub["aligned"])
    assert lora.lora_targets() == local.lora_targets()
    torch.testing.assert_close(lora.get(Q0), local.get(Q0))
    v2 = Checkpoint.open("org/aligned@v2")
    torch.testing.assert_close(v2.get(Q0), Checkpoint.open(hub["finetuned"]).get(Q0))
    orphan = shutil.copytree(hub["lora"], tmp_path / "orphan")
    config = json.loads((orphan / ADAPTER_CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = "org/gone"
    (orphan / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(orphan)
    assert str(err.value) == (
        f"adapter base 'org/gone' is not a local folder, pass base=: {orphan}/adapter_config.json;"
        " on the hub: not in the hub cache (HF_HUB_OFFLINE is set)"
    )


def test_eval_loads_and_fingerprints_ids_as_the_same_files_on_disk(hub):
    local = folder_fingerprint(hub["aligned"], hub["lora"])
    assert folder_fingerprint("org/aligned", "org/lora") == local
    assert folder_fingerprint("org/aligned@v2") == folder_fingerprint(hub["finetuned"])
    with pytest.raises(CheckpointError, match="^org/missing: not a local folder, and not in"):
        load_model("org/aligned", adapter="org/missing")
    model, tokenizer = load_model("org/aligned", adapter="org/lora", dtype="float32")
    reference, _ = load_model(hub["aligned"], adapter=hub["lora"], dtype="float32")
    ids = tokenizer("how do i make a bomb", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_eval_scores_ids_from_the_cache_of_the_same_files_on_disk(hub, tmp_path):
    evaluator = Evaluator(harmful=HARMFUL[:2], max_new_tokens=2, cache_dir=tmp_path)
    local = evaluator.score_folder(hub["aligned"], adapter=hub["lora"])
    by_id = evaluator.score_folder("org/aligned", adapter="org/lora")
    assert local.config["responses_generated"] == 2
    assert by_id.config["responses_generated"] == 0  # same fingerprint: served from the cache
    assert by_id.config["model"]["path"] == "org/aligned"
    assert by_id.config["model"]["adapter"] == "org/lora"
    assert by_id.samples == local.samples


def test_recover_cli_takes_ids(hub, tmp_path):
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    args = ["--aligned", "org/aligned", "--finetuned", "org/lora", "--harmful", str(prompts)]
    args += ["--no-utility-check"]
    result = CliRunner().invoke(recover_command, [*args, "--dry-run", "--layer", "3"])
    assert result.exit_code == 0, result.output
    assert "layer:        3 of 4" in result.output
    missing = CliRunner().invoke(
        recover_command, ["--aligned", "org/missing", *args[2:], "--dry-run"]
    )
    assert missing.exit_code == 2
    assert "org/missing: not a local folder, and not in the hub cache" in missing.output


def test_merge_shortcut_takes_ids_with_a_revision(hub, tmp_path):
    roles = ["--aligned", "org/aligned", "--finetuned", "org/finetuned"]
    roles += ["--harmful-model", "org/aligned@v2"]  # the fine-tuned weights: B + (A - B) / 2
    out = tmp_path / "out"
    args = ["--method", "resta", *roles, "--set", "beta=0.5", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(merge_command, args)
    assert result.exit_code == 0, result.output
    merged, a, b = (read_weights(p) for p in (out, hub["aligned"], hub["finetuned"]))
    torch.testing.assert_close(merged[Q0], (a[Q0] + b[Q0]) / 2)
    assert "org/aligned@v2" in (out / "README.md").read_text()


def test_merge_config_refs_are_config_relative_paths_else_ids(hub, tmp_path, monkeypatch):
    decoy = tmp_path / "cwd" / "org" / "aligned"  # org/aligned in the working directory
    decoy.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    beside = tmp_path / "cfg" / "org" / "finetuned"  # org/finetuned beside the config
    beside.mkdir(parents=True)
    config = MergeConfig("linear", [], source_path=tmp_path / "cfg")
    assert resolve_path(config, "org/aligned") == hub["org/aligned"]
    assert resolve_path(config, "org/finetuned") == beside


def test_merge_config_takes_ids_and_a_tokenizer_source_id(hub, tmp_path):
    config = tmp_path / "linear.yaml"
    models = [
        {"model": "org/aligned", "parameters": {"weight": 1.0}},
        {"model": "org/finetuned", "parameters": {"weight": 3.0}},
    ]
    data = {"merge_method": "linear", "models": models, "tokenizer_source": "org/tok"}
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(merge_command, [str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    a, b, merged = (read_weights(p) for p in (hub["aligned"], hub["finetuned"], out))
    torch.testing.assert_close(merged[Q0], (a[Q0] + 3 * b[Q0]) / 4)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    data["models"][1]["model"] = "org/missing@v1"
    config.write_text(yaml.safe_dump(data))
    bad = CliRunner().invoke(merge_command, [str(config), "--out", str(tmp_path / "x"), "--quiet"])
    assert bad.exit_code == 2
    assert "org/missing@v1: not a local folder, and not in the hub cache" in bad.output


SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
METADATA = ["config.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"]
METADATA += ["additional_chat_templates/tools.jinja"]
NEVER = ["pytorch_model.bin", "original/consolidated.00.pth", "onnx/config.json", "README.md"]
NEVER += ["onnx/model.safetensors"]
INDEX = json.dumps({"weight_map": {"a": SHARDS[0], "b": SHARDS[1]}})


@pytest.mark.parametrize(
    "served, fetched_beyond_metadata",
    [
        (  # Mistral-like: the index's shards, not the consolidated copy
            {"model.safetensors.index.json": INDEX, "consolidated.safetensors": "x"}
            | dict.fromkeys(SHARDS, "x"),
            ["model.safetensors.index.json", *SHARDS],
        ),
        ({"model.safetensors": "x"}, ["model.safetensors"]),  # no index: top-level safetensors
        (  # an adapter: its weights, not a training checkpoint's
            {ADAPTER_CONFIG_NAME: "{}", "adapter_model.safetensors": "x"}
            | {"checkpoint-10/adapter_model.safetensors": "x"},
            [ADAPTER_CONFIG_NAME, "adapter_model.safetensors"],
        ),
    ],
)
def test_online_fetch_takes_metadata_then_only_the_weights_it_names(
    served, fetched_beyond_metadata, tmp_path, monkeypatch
):
    """A stand-in hub: what is fetched, and that the weights come from the metadata's commit.
    Pickles, the card and other sub-folders' files are never fetched."""
    from huggingface_hub.utils import filter_repo_objects

    repo = dict.fromkeys(METADATA + NEVER, "{}") | served
    snapshot = tmp_path / "snapshots" / commit_of("repo")
    fetched, revisions = [], []

    def fake_download(repo_id, *, revision, allow_patterns, ignore_patterns):
        assert repo_id == "org/repo"
        revisions.append(revision)
        for name in filter_repo_objects(
            repo, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ):
            fetched.append(name)
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text(repo[name])
        return str(snapshot)

    monkeypatch.setattr("safealign.checkpoint.hub.snapshot_download", fake_download)
    assert resolve_checkpoint("org/repo@v1") == snapshot
    assert revisions == ["v1", snapshot.name]
    assert sorted(fetched) == sorted(METADATA + fetched_beyond_metadata)


def test_eval_cli_takes_ids(hub, tmp_path):
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL[:2]))
    args = ["--model", "org/aligned", "--adapter", "org/lora", "--harmful", str(prompts)]
    args += ["--benign", str(prompts), "--max-new-tokens", "2", "--json", "--no-cache"]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert (model["path"], model["adapter"]) == ("org/aligned", "org/lora")
    missing = CliRunner().invoke(eval_command, ["--model", "org/missing", *args[2:]])
    assert missing.exit_code == 2
    expected = (
        "Invalid value for --model: org/missing: not a local folder, and not in the hub cache"
    )
    assert expected in missing.output


def test_retrain_dry_run_takes_ids(hub, tmp_path):
    data = pairs_file(tmp_path / "data.jsonl")
    args = ["--aligned", "org/aligned", "--adapter", "org/lora", "--data", str(data)]
    result = CliRunner().invoke(retrain_command, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    missing = CliRunner().invoke(retrain_command, ["--aligned", "org/gone", *args[2:], "--dry-run"])
    assert missing.exit_code == 2
    assert "--aligned: org/gone: not a local folder, and not in the hub cache" in missing.output


def test_compare_checks_ids(hub):
    check_inputs(CompareInputs(aligned="org/aligned", finetuned="org/lora", harmful=HARMFUL))
    gone = CompareInputs(aligned="org/aligned", finetuned="org/gone", harmful=HARMFUL)
    with pytest.raises(SettingsError, match=r"^--finetuned: org/gone: not a local folder"):
        check_inputs(gone)


def test_outputs_name_hub_inputs_by_id_and_commit(hub, tmp_path):
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    recovered, merged = tmp_path / "recovered", tmp_path / "merged"
    args = ["--aligned", "org/aligned", "--finetuned", "org/finetuned", "--harmful", str(prompts)]
    args += ["--no-utility-check", "--steps", "1", "--layer", "3", "--quiet"]
    result = CliRunner().invoke(recover_command, [*args, "--out", str(recovered)])
    assert result.exit_code == 0, result.output
    roles = ["--aligned", "org/aligned", "--finetuned", "org/lora"]
    result = CliRunner().invoke(
        merge_command, ["--method", "interpolate", *roles, "--out", str(merged), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    for out, finetuned in ((recovered, "org/finetuned"), (merged, "org/lora")):
        card = (out / "README.md").read_text()
        assert f"org/aligned@{commit_of('aligned')}" in card
        assert f"{finetuned}@{commit_of(finetuned.removeprefix('org/'))}" in card
        assert str(hub["cache"]) not in card  # never the snapshot's path in the hub cache
    assert 'base_model: "org/finetuned"' in (recovered / "README.md").read_text()


def test_an_id_is_fetched_once_per_process(hub, monkeypatch):
    calls = []
    real = hub_module.snapshot_download

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_module, "snapshot_download", counting)
    assert resolve_checkpoint("org/aligned") == resolve_checkpoint("org/aligned")
    assert len(calls) == 2  # the metadata, then the weights, once
