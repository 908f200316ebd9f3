"""recover on tiny random checkpoints: exact restoration, rollback, adapters, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from recover_support import (
    HARMFUL,
    NO_REPAIR,
    TASK_PROMPTS,
    make_adapter,
    make_pair,
    no_repair_case,
    run_recover,
    self_task,
    tiny_config,
    tiny_tokenizer,
)
from safetensors import safe_open
from safetensors.torch import load_file

from safealign.checkpoint import Checkpoint, CheckpointError
from safealign.eval import generate
from safealign.eval.judges import KeywordJudge
from safealign.recover import RecoverInputs, RecoverSettings, recover
from safealign.recover.cli import recover_command
from safealign.recover.sets import Sets
from safealign.recover.weights import layout, load_working_model
from safealign.settings import SettingsError

FAST = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    aligned, finetuned = make_pair(root)
    return root, aligned, finetuned


def _tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def _check_exact(out, aligned: Checkpoint, finetuned: Checkpoint, report: dict) -> int:
    """Every restorable element of C equals A or B exactly; all else equals B. Returns the
    number of elements at A's value where A != B."""
    c = _tensors(out)
    lay = layout(finetuned, report["settings"]["layer"])
    targets = {t.name for t in lay.targets}
    restored = 0
    for name in finetuned.names():
        b = finetuned.get(name).to(c[name].dtype)
        if name not in targets:
            assert torch.equal(c[name], b), name
            continue
        a = aligned.get(name).to(c[name].dtype)
        at_a, at_b = c[name] == a, c[name] == b
        assert bool((at_a | at_b).all()), f"{name}: element equal to neither A nor B"
        restored += int((at_a & ~at_b).sum())
    return restored


def test_restored_equal_aligned_untouched_equal_finetuned(pair):
    root, aligned, finetuned = pair
    result = run_recover(
        aligned, finetuned, root / "out", harmful=HARMFUL, rate=0.01, steps=3, warmup=1, **FAST
    )
    report = json.loads((root / "out" / "report.json").read_text())
    a, b = Checkpoint.open(aligned), Checkpoint.open(finetuned)
    restored = _check_exact(root / "out", a, b, report)
    k = result.plan.per_step
    assert [s.restored for s in result.run.steps] == [k, k, k]
    assert restored == result.run.restored == 3 * k == report["run"]["restored"]
    # nothing in blocks at or above the direction layer, nor outside decoder matrices
    assert set().union(*(s.per_layer for s in result.run.steps)) <= set(
        range(result.settings.layer)
    )
    assert report["scores"]["recovered"]["harmful_rate"] is not None
    assert "no task data" in report["warnings"][0]


def test_restoration_raises_cosine_to_aligned_direction(pair):
    root, aligned, finetuned = pair
    result = run_recover(
        aligned, finetuned, root / "cos", harmful=HARMFUL, rate=0.05, steps=4, **FAST
    )
    losses = [s.loss for s in result.run.steps]
    assert losses[-1] < losses[0]  # -cos falls: the harmful centroid turns toward A's


def test_bf16_working_copy_restores_exactly(pair):
    root, aligned, finetuned = pair
    run_recover(
        aligned, finetuned, root / "bf16", harmful=HARMFUL, rate=0.01, steps=2, dtype="bf16", **FAST
    )
    c = _tensors(root / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in c.values())
    report = json.loads((root / "bf16" / "report.json").read_text())
    restored = _check_exact(
        root / "bf16", Checkpoint.open(aligned), Checkpoint.open(finetuned), report
    )
    assert restored == report["run"]["restored"] > 0


def test_adapter_input(tmp_path):
    aligned, _ = make_pair(tmp_path)
    adapter = make_adapter(tmp_path, aligned)
    result = run_recover(
        aligned, adapter, tmp_path / "out", harmful=HARMFUL, rate=0.01, steps=2, **FAST
    )
    a = Checkpoint.open(aligned)
    b = Checkpoint.open(adapter, base=a)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    restored = _check_exact(tmp_path / "out", a, b, report)
    assert restored == result.run.restored > 0
    assert result.plan.finetuned_is_adapter
    # only LoRA targets differ from A, so only they can be restored
    lay = layout(b, result.settings.layer)
    c = _tensors(tmp_path / "out")
    for target in lay.targets:
        if target.name not in b.lora_targets():
            assert torch.equal(c[target.name], a.get(target.name))


def _failing_run(tmp_path, schedule: str, **settings):
    """recover on a pair whose every restore lowers utility (a task only B knows; by default
    metric_drop 0, so every check fails): the pair, the task and the result. (How many
    elements each rollback gives back is pinned against a dense reference in
    ``test_recover_dense.py``.)"""
    aligned, finetuned = make_pair(tmp_path, noise=0.05)
    task = self_task(aligned, finetuned, FAST["max_new_tokens"])
    result = run_recover(
        aligned,
        finetuned,
        tmp_path / "out",
        harmful=HARMFUL,
        task=task,
        schedule=schedule,
        **{"rate": 0.03, "steps": 4, "warmup": 1, "metric_drop": 0.0, **settings},
        **FAST,
    )
    return aligned, finetuned, task, result


def test_rollback_fires_and_kept_step_holds(tmp_path):
    # half of B's utility may go: some steps hold once rolled back, others do not
    aligned, finetuned, task, result = _failing_run(
        tmp_path, "guarded", rollback_rate=0.5, metric_drop=0.5
    )
    steps = result.run.steps
    assert result.scores["finetuned"]["utility"] == 1.0
    fired = [s for s in steps if s.rolled_back]
    assert fired, "no rollback"
    for s in fired:
        assert s.utility_before_rollback < 0.5
    # only failing steps roll back, half their restores at most (rounded up)
    for s in steps:
        limit = 0 if s.utility_before_rollback is None else -(-s.restored // 2)
        assert s.rolled_back <= limit
    holding = [s.step for s in steps if s.holds]
    assert holding and result.run.kept_step == holding[-1] < steps[-1].step
    # the written model scores what the kept step scored on the checked half, and that holds
    c, tokenizer = load_working_model(
        Checkpoint.open(aligned), Checkpoint.open(tmp_path / "out"), torch.float32, None
    )
    check = task[len(task) // 2 :]
    replies = generate(
        c,
        tokenizer,
        [e["prompt"] for e in check],
        batch_size=4,
        max_new_tokens=FAST["max_new_tokens"],
    )
    utility = sum(r == e["answer"] for r, e in zip(replies, check, strict=True)) / len(check)
    assert utility == result.scores["recovered"]["utility"] == result.run.utility >= 0.5
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (
        _check_exact(tmp_path / "out", Checkpoint.open(aligned), Checkpoint.open(finetuned), report)
        == result.run.restored
    )


def _jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_checks_generate_only_what_they_decide_on(tmp_path, monkeypatch):
    """A check answers the task prompts it decides on, never the harmful ones: those are
    answered by B, A and the kept state only, and the kept state's harmful rate is C's."""
    import safealign.eval.evaluator as evaluator_module

    asked: list[str] = []
    real = evaluator_module.generate

    def spy(model, tokenizer, prompts, **options):
        asked.extend(prompts)
        return real(model, tokenizer, prompts, **options)

    monkeypatch.setattr(evaluator_module, "generate", spy)
    aligned, _, task, result = _failing_run(tmp_path, "guarded", rollback_rate=0.5, metric_drop=0.5)
    steps = result.run.steps
    checks = sum(s.holds is not None for s in steps) + sum(bool(s.rolled_back) for s in steps)
    checked = [e["prompt"] for e in task[len(task) // 2 :]]
    assert checks > len(steps)  # every step checked, some twice (after their rollback)
    assert sum(p in set(HARMFUL) for p in asked) == 3 * len(set(HARMFUL))
    assert sum(p in set(checked) for p in asked) == (2 + checks) * len(set(checked))
    c, tokenizer = load_working_model(
        Checkpoint.open(aligned), Checkpoint.open(tmp_path / "out"), torch.float32, None
    )
    replies = real(c, tokenizer, HARMFUL, max_new_tokens=FAST["max_new_tokens"])
    complied = [not v.refused for v in KeywordJudge().judge(HARMFUL, replies)]
    assert result.scores["recovered"]["harmful_rate"] == sum(complied) / len(HARMFUL)


def test_no_repair_held_exits_1_and_writes_only_when_asked(tmp_path):
    """A task only B knows, checked at a 0% drop: no state holds, so recover exits 1 naming
    the best state it reached and writes nothing; --write-unchanged writes B, saying so."""
    aligned, finetuned, task = no_repair_case(tmp_path)
    args = ["--aligned", str(aligned), "--finetuned", str(finetuned), "--quiet"]
    args += ["--harmful", _jsonl(tmp_path / "h.jsonl", [{"prompt": p} for p in HARMFUL])]
    args += ["--task", _jsonl(tmp_path / "t.jsonl", task)]
    for name, value in NO_REPAIR.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    out = tmp_path / "out"
    runner = CliRunner()
    failed = runner.invoke(recover_command, [*args, "--out", str(out), "--json"])
    assert failed.exit_code == 1, failed.output
    report = json.loads(failed.stdout)
    scores = report["scores"]
    assert scores["aligned"]["utility"] < scores["finetuned"]["utility"] == 1.0  # B's task
    checked = [s for s in report["run"]["steps"] if s["holds"] is not None]
    assert checked and not any(s["holds"] for s in checked)
    assert report["run"]["kept_step"] == 0 and "recovered" not in scores
    assert report["out"] is None and not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left either
    closest = max(s["utility"] for s in checked)  # the checked state nearest to holding
    assert f"reached utility {closest:.3f} (floor 1.000)" in report["failure"]
    assert (
        f"fine-tuned model: harmful rate {scores['finetuned']['harmful_rate']:.3f}"
        in (report["failure"])
    )
    assert failed.stderr.splitlines()[-1] == f"no repair held: {report['failure']}; nothing written"

    kept = runner.invoke(recover_command, [*args, "--out", str(out), "--write-unchanged"])
    assert kept.exit_code == 1, kept.output
    assert kept.stderr.splitlines()[-1].endswith(" unchanged")
    c, b = _tensors(out), _tensors(finetuned)
    assert c.keys() == b.keys() and all(torch.equal(c[n], b[n]) for n in b)
    written = json.loads((out / "report.json").read_text())
    assert written["failure"] == report["failure"] and written["settings"]["write_unchanged"]
    card = (out / "README.md").read_text()
    assert "Not repaired: this is the fine-tuned model" in card and report["failure"] in card


def _count_reads(monkeypatch) -> list[str]:
    """The names of the tensors read from any checkpoint from now on."""
    from safealign.checkpoint.store import TensorStore

    reads: list[str] = []
    real = TensorStore.get

    def counting(self, name, dtype=None):
        reads.append(name)
        return real(self, name, dtype)

    monkeypatch.setattr(TensorStore, "get", counting)
    return reads


def test_dry_run_writes_nothing_and_reads_headers_only(pair, tmp_path, monkeypatch):
    _, aligned, finetuned = pair
    out = tmp_path / "never"
    reads = _count_reads(monkeypatch)
    result = run_recover(aligned, finetuned, out, harmful=HARMFUL, dry_run=True)
    assert reads == []
    assert not out.exists() and not list(tmp_path.iterdir())
    plan = result.plan
    assert plan.settings.layer == 4 and plan.n_layers == 4  # small model: every block
    assert plan.settings.rate == 0.002  # the paper's rate
    # counted from the file's header: k is the rate times every decoder parameter, rounded up
    with safe_open(str(finetuned / "model.safetensors"), "pt") as f:
        sizes = {name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()}
    decoder = {name: n for name, n in sizes.items() if name.startswith("model.layers.")}
    assert plan.per_step == math.ceil(0.002 * sum(decoder.values()))
    assert "layer:        4 of 4" in plan.describe()
    paper = run_recover(aligned, finetuned, out, harmful=HARMFUL, layer=2, rate=0.002, dry_run=True)
    below = [n for name, n in decoder.items() if int(name.split(".")[2]) < 2 and "norm" not in name]
    assert paper.plan.restorable_params == sum(below)  # blocks 0..1, norms never restored
    assert paper.plan.per_step == plan.per_step  # k counts every decoder parameter


def _forbid_loading(monkeypatch) -> None:
    """Fail the test if a model is loaded: bad input must be refused before that."""
    import safealign.recover.working as working

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(working, "load_working_model", refuse)


def _other(tmp_path, name, **cfg):
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    model = LlamaForCausalLM(tiny_config(tokenizer, **cfg))
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"hidden": 64}, "shapes differ"),
        ({"layers": 3}, "tensor names differ"),
        ({"vocab_size": 90}, "vocab_size differs"),
    ],
)
def test_bad_pair_fails_fast_and_writes_nothing(pair, tmp_path, monkeypatch, cfg, message):
    _, aligned, _ = pair
    other = _other(tmp_path, "other", **cfg)
    out = tmp_path / "out"
    _forbid_loading(monkeypatch)
    with pytest.raises(CheckpointError, match=message):
        run_recover(aligned, other, out, harmful=HARMFUL)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_bad_architecture(pair, tmp_path):
    _, aligned, finetuned = pair
    other = tmp_path / "mistral"
    other.mkdir()
    for file in finetuned.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="architecture differs"):
        run_recover(aligned, other, tmp_path / "out", harmful=HARMFUL)
    assert not (tmp_path / "out").exists()


def test_bad_settings_fail_before_work(pair, tmp_path, monkeypatch):
    _, aligned, finetuned = pair
    _forbid_loading(monkeypatch)
    with pytest.raises(SettingsError, match="^--layer must be in 1..4"):
        run_recover(aligned, finetuned, tmp_path / "o", harmful=HARMFUL, layer=9)
    # range errors come before any checkpoint is opened: these folders do not exist
    missing = tmp_path / "missing"
    for bad, message in [
        ({"rate": 2.0}, "--rate must be in (0, 1), got 2.0"),
        ({"sweep": (0.01, 1.5)}, "--sweep must be in (0, 1), got 1.5"),
        ({"warmup": -1}, "--warmup must be >= 0, got -1"),
        ({"dtype": "fp8"}, "--dtype: unknown dtype 'fp8'"),
    ]:
        with pytest.raises(SettingsError) as error:
            run_recover(missing, missing, tmp_path / "o", **bad)
        assert str(error.value).startswith(message)
    with pytest.raises(TypeError, match="ratee"):
        run_recover(missing, missing, tmp_path / "o", ratee=0.1)
    assert not (tmp_path / "o").exists()


def test_settings_are_recorded_resolved(pair, tmp_path):
    _, aligned, finetuned = pair
    given = RecoverSettings(rate=0.01, steps=2)
    inputs = RecoverInputs(aligned, finetuned, harmful=HARMFUL)
    dry = recover(inputs, given.replace(dry_run=True))
    # adaptive (the default) leaves the warm-up to each attempt; the paper's 5 under paper,
    # 1 under guarded on a small model
    resolved = given.replace(layer=4, dtype="float32", device="cpu", dry_run=True, max_cost=8.0)
    assert dry.settings == resolved and resolved.warmup is None
    for schedule, warmup in (("paper", 5), ("guarded", 1)):
        fixed = recover(inputs, given.replace(schedule=schedule, dry_run=True))
        assert fixed.settings.warmup == warmup
    result = recover(inputs, given.replace(**FAST), tmp_path / "c")
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["settings"] == result.settings.to_dict()
    assert report["settings"]["layer"] == 4 and report["settings"]["dtype"] == "float32"
    card = (tmp_path / "c" / "README.md").read_text()
    assert "Kept step 2 of 2" in card


def test_cli_dry_run_and_bad_pair(pair, tmp_path):
    root, aligned, finetuned = pair
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    runner = CliRunner()
    args = ["--aligned", str(aligned), "--finetuned", str(finetuned), "--harmful", str(prompts)]
    args.append("--no-utility-check")
    ok = runner.invoke(recover_command, [*args, "--dry-run", "--layer", "3"])
    assert ok.exit_code == 0, ok.output
    assert "layer:        3 of 4" in ok.output
    other = _other(tmp_path, "other", hidden=64)
    bad = runner.invoke(
        recover_command,
        [
            "--aligned",
            str(aligned),
            "--finetuned",
            str(other),
            "--out",
            str(tmp_path / "o"),
            "--harmful",
            str(prompts),
            "--no-utility-check",
        ],
    )
    assert bad.exit_code == 2 and "shapes differ" in bad.output
    assert not (tmp_path / "o").exists()
    usage = runner.invoke(recover_command, args)
    assert usage.exit_code == 2 and "--out is required" in usage.output


def test_cli_refuses_out_of_range_before_opening_anything(tmp_path):
    missing = str(tmp_path / "missing")
    args = ["--aligned", missing, "--finetuned", missing, "--out", str(tmp_path / "o")]
    runner = CliRunner()
    for flags, message in [
        (["--rate", "2"], "Error: --rate must be in (0, 1), got 2.0\n"),
        (["--steps", "0"], "Error: --steps must be >= 1, got 0\n"),
        (["--sweep", "0.1,2"], "Error: --sweep must be in (0, 1), got 2.0\n"),
    ]:
        bad = runner.invoke(recover_command, [*args, *flags])
        assert (bad.exit_code, bad.output) == (2, message)
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_run_without_task_data_before_opening_anything(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing")
    reads = _count_reads(monkeypatch)
    args = ["--aligned", missing, "--finetuned", missing, "--out", str(tmp_path / "o")]
    bad = CliRunner().invoke(recover_command, args)
    assert bad.exit_code == 2
    assert bad.output.startswith("Error: --task is required") and "--no-utility-check" in bad.output
    assert bad.output.count("\n") == 1 and reads == []
    opened = CliRunner().invoke(recover_command, [*args, "--no-utility-check", "--quiet"])
    assert opened.exit_code == 2
    assert opened.output.splitlines()[-1] == f"Error: checkpoint not found: {missing}"


def test_cli_dry_run_json_is_the_plan_and_reads_no_weight(pair, tmp_path, monkeypatch):
    _, aligned, finetuned = pair
    reads = _count_reads(monkeypatch)
    args = ["--aligned", str(aligned), "--finetuned", str(finetuned), "--no-utility-check"]
    result = CliRunner().invoke(recover_command, [*args, "--dry-run", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plan"]["n_layers"] == 4 and report["out"] is None
    assert reads == []


def test_cli_dry_run_prints_plan_with_settings(pair, tmp_path):
    _, aligned, finetuned = pair
    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    args = ["--aligned", str(aligned), "--finetuned", str(finetuned), "--harmful", str(prompts)]
    flags = ["--rate", "0.01", "--steps", "3", "--warmup", "2", "--dtype", "bf16"]
    flags.append("--no-utility-check")
    ok = CliRunner().invoke(recover_command, [*args, *flags, "--dry-run"])
    assert ok.exit_code == 0, ok.output
    assert "rate 0.01 x" in ok.output and "3 steps, warm-up 2" in ok.output
    assert "dtype:        bfloat16" in ok.output
    assert "rollback:     off (no task data)" in ok.output
    assert not list(tmp_path.glob("*/report.json"))


def test_limit_cuts_every_set_to_its_first_items(pair):
    _, aligned, finetuned = pair
    task = [{"prompt": p, "answer": "5"} for p in TASK_PROMPTS]
    sets = {"harmful": HARMFUL, "benign": TASK_PROMPTS, "task": task}
    full = run_recover(aligned, finetuned, dry_run=True, **sets).sets
    cut = run_recover(aligned, finetuned, dry_run=True, limit=2, **sets).sets
    assert len(HARMFUL) > 2 and len(TASK_PROMPTS) == 4
    assert {role: s and s["n"] for role, s in full.items()} == {
        "harmful": len(HARMFUL),
        "eval_harmful": len(HARMFUL),
        "task": 2,
        "task_train": 2,
        "benign": 2,  # benign prompts are split as the task is
        "benign_train": 2,
    }
    assert {role: s and s["n"] for role, s in cut.items()} == {
        "harmful": 2,
        "eval_harmful": 2,
        "task": 1,  # the first 2 examples, split into 1 to steer and 1 to check
        "task_train": 1,
        "benign": 1,
        "benign_train": 1,
    }
    assert cut["benign"]["name"] == "benign[:2][1:]"


def test_sweep_reports_each_rate_and_output_matches_main_rate(pair):
    root, aligned, finetuned = pair
    result = run_recover(
        aligned,
        finetuned,
        root / "sweep",
        harmful=HARMFUL,
        rate=0.01,
        steps=2,
        sweep=(0.005, 0.01, 0.02),
        **FAST,
    )
    assert [row["rate"] for row in result.sweep] == [0.005, 0.01, 0.02]
    restored = {row["rate"]: row["restored"] for row in result.sweep}
    assert restored[0.005] < restored[0.01] < restored[0.02]
    report = json.loads((root / "sweep" / "report.json").read_text())
    assert (
        _check_exact(root / "sweep", Checkpoint.open(aligned), Checkpoint.open(finetuned), report)
        == restored[0.01]
    )


def test_default_layer_paper_for_deep_models_last_for_small():
    from safealign.recover.weights import default_layer, default_warmup

    assert default_layer(32) == 21 and default_layer(18) == 12  # floor(4n/6), the paper's
    assert default_warmup(32) == 5
    assert default_layer(4) == 4 and default_layer(6) == 6 and default_warmup(6) == 1


def test_benign_prompts_split_into_steering_and_checked_halves():
    """As the task: without benign_train the first half of benign steers the rollback and the
    second half is checked; with it, benign is checked whole and benign_train steers."""
    task = [{"prompt": f"t{i}", "answer": "a"} for i in range(4)]
    benign = [f"b{i}" for i in range(5)]
    split = Sets.load(HARMFUL, None, task, benign, None)
    assert split.benign_train.prompts == ["b0", "b1"]
    assert split.benign.prompts == ["b2", "b3", "b4"]
    assert split.keep_prompts == [["t0", "t1"], ["b0", "b1"]]
    given = Sets.load(HARMFUL, None, task, benign, None, benign_train=["s0"])
    assert given.benign.prompts == benign
    assert given.keep_prompts[1] == ["s0"]
    assert given.describe()["benign_train"]["n"] == 1
