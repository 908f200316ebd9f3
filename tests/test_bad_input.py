"""Every command refuses bad input the same way: exit status 2, one line on stderr naming what
is wrong and where, no traceback, and not one file written or changed.

One table of argv drives the CLI in-process. ``{name}`` in an argument is a path of the world
(``bad_input_support``: models, data, configs), ``{out}`` a fresh output folder and ``{full}``
an existing non-empty one, both in a folder whose content is hashed before and after too.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from bad_input_support import build_configs, build_data, build_models, tree_hashes
from click.testing import CliRunner

from safealign import resources
from safealign.cli import main


def flag(command: str, *names: str) -> str:
    """The first of ``names`` that ``command`` has (flags being renamed keep the table valid)."""
    options = {opt for p in main.commands[command].params for opt in getattr(p, "opts", [])}
    return next(name for name in names if name in options)


EVAL_OUT = flag("eval", "--out", "--output")
GRAD_BATCH = flag("recover", "--grad-batch-size", "--batch-size")

EVAL = "eval --model {aligned} --harmful {harmful} --benign {harmful} --limit 2 --no-cache --quiet"
RECOVER = "recover --aligned {aligned} --finetuned {finetuned} --harmful {harmful} --task {task} --out {out} --quiet"  # noqa: E501
MERGE = "merge --method interpolate --aligned {aligned} --finetuned {finetuned} --out {out} --quiet"
RETRAIN = "retrain --aligned {aligned} --data {pairs} --harmful {harmful} --benign {harmful} --out {out} --epochs 1 --cpu --quiet"  # noqa: E501
COMPARE = (
    "compare --aligned {aligned} --finetuned {finetuned} --harmful {harmful} --out {out} --quiet"
)
RESTA = (
    "merge --method resta --aligned {aligned} --harmful-model {unaligned} --finetuned {finetuned}"
)
DENSE = RESTA.replace("resta", "resta:density=1.5") + " --out {out} --quiet"


def on(template: str, extra: str = "", **swap: str) -> str:
    """``template`` with placeholder ``{old}`` swapped for ``{new}`` and ``extra`` appended."""
    for old, new in swap.items():
        template = template.replace(f"{{{old}}}", f"{{{new}}}")
    return f"{template} {extra}".strip()


#: (case id, argv, regex the message must match, placeholder the message must name or None)
# fmt: off
CASES = [
    # -- eval
    ("eval-missing-model", on(EVAL, aligned="gone"), r"not found", "gone"),
    ("eval-truncated", on(EVAL, aligned="truncated"), r"outside the file, truncated", "truncated"),
    ("eval-nan", on(EVAL, aligned="nan"), r"non-finite values \(NaN", "nan"),
    ("eval-inf", on(EVAL, aligned="inf"), r"non-finite values \(Inf", "inf"),
    ("eval-pickle", on(EVAL, aligned="pickle"), r"pickle-only.*--allow-pickle", "pickle"),
    ("eval-no-tokenizer", on(EVAL, aligned="no_tokenizer"), r"no tokenizer", "no_tokenizer"),
    ("eval-adapter-wrong-base", on(EVAL, "--adapter {adapter}", aligned="other_base"),
     r"do not fit base weight", "adapter"),
    ("eval-empty-harmful", on(EVAL, harmful="empty"), r"empty file", "empty"),
    ("eval-malformed-jsonl", on(EVAL, harmful="malformed"), r"malformed JSON", "malformed"),
    ("eval-binary-jsonl", on(EVAL, harmful="binary"), r"not UTF-8", "binary"),
    ("eval-csv-no-answer", on(EVAL, "--task {no_answer_csv}"), r"missing answer field",
     "no_answer_csv"),
    ("eval-csv-no-prompt", on(EVAL, harmful="no_prompt_csv"), r"missing prompt field",
     "no_prompt_csv"),
    ("eval-rows-not-objects", on(EVAL, harmful="list_rows"), r"object or a string", "list_rows"),
    ("eval-rate-above-1", on(EVAL, "--max-harmful-rate 1.5"), r"--max-harmful-rate", None),
    ("eval-rate-negative", on(EVAL, "--min-utility -0.1"), r"--min-utility", None),
    ("eval-limit-zero", on(EVAL, "--limit 0"), r"--limit must be >= 1", None),
    ("eval-unknown-judge", on(EVAL, "--judge oracle"), r"unknown judge 'oracle'", None),
    ("eval-durability-no-data", on(EVAL, "--durability 5"), r"--durability needs --durability-data",
     None),
    ("eval-durability-malformed-data", on(EVAL, "--durability 5 --durability-data {malformed}"),
     r"malformed JSON", "malformed"),
    # -- recover
    ("recover-missing", on(RECOVER, finetuned="gone"), r"not found", "gone"),
    ("recover-truncated", on(RECOVER, finetuned="truncated"), r"truncated", "truncated"),
    ("recover-offset-past-end", on(RECOVER, finetuned="past_end"), r"outside the file",
     "past_end"),
    ("recover-huge-header", on(RECOVER, finetuned="huge_header"), r"header length",
     "huge_header"),
    ("recover-overlapping-offsets", on(RECOVER, finetuned="overlap"), r"overlaps", "overlap"),
    ("recover-huge-tensor", on(RECOVER, finetuned="shape_lie"), r"does not fill", "shape_lie"),
    ("recover-nan-finetuned", on(RECOVER, finetuned="nan"), r"NaN", "nan"),
    ("recover-inf-aligned", on(RECOVER, aligned="inf"), r"Inf", "inf"),
    ("recover-wrong-shape", on(RECOVER, finetuned="wrong_shape"), r"shapes differ",
     "wrong_shape"),
    ("recover-vocab", on(RECOVER, finetuned="small_vocab"), r"vocab_size differs", "small_vocab"),
    ("recover-adapter-wrong-base", on(RECOVER, aligned="other_base", finetuned="adapter"),
     r"do not fit base weight", "adapter"),
    ("recover-pickle", on(RECOVER, finetuned="pickle"), r"--allow-pickle", "pickle"),
    ("recover-rate-negative", on(RECOVER, "--rate -0.1"), r"--rate must be", None),
    ("recover-rate-above-1", on(RECOVER, "--rate 1.5"), r"--rate must be", None),
    ("recover-zero-steps", on(RECOVER, "--steps 0"), r"--steps must be", None),
    ("recover-metric-drop", on(RECOVER, "--metric-drop -1"), r"--metric-drop must be", None),
    ("recover-zero-batch", on(RECOVER, f"{GRAD_BATCH} 0"), r"batch-size must be", None),
    ("recover-layer-out-of-range", on(RECOVER, "--layer 99"), r"layer must be in", None),
    ("recover-out-inside-input", on(RECOVER, out="inside_aligned"), r"overwrite an input",
     "aligned"),
    ("recover-out-is-input", on(RECOVER, out="finetuned"), r"overwrite an input", "finetuned"),
    ("recover-out-is-input-overwrite", on(RECOVER, "--overwrite", out="aligned"),
     r"overwrite an input", "aligned"),
    ("recover-out-contains-input", on(RECOVER, "--overwrite", out="models"),
     r"contains an input", "models"),
    ("recover-out-not-empty", on(RECOVER, out="full"), r"not empty", "full"),
    ("recover-empty-harmful", on(RECOVER, harmful="empty"), r"empty file", "empty"),
    ("recover-task-no-answer", on(RECOVER, task="no_answer_csv"), r"missing answer field",
     "no_answer_csv"),
    ("recover-task-malformed", on(RECOVER, task="malformed"), r"malformed JSON", "malformed"),
    # -- merge
    ("merge-unknown-yaml-key", "merge {merge_unknown_key} --out {out} --quiet",
     r"unknown key 'merge_methd'", "merge_unknown_key"),
    ("merge-malformed-yaml", "merge {malformed_yaml} --out {out} --quiet", r"invalid YAML",
     "malformed_yaml"),
    ("merge-yaml-not-mapping", "merge {not_a_mapping} --out {out} --quiet", r"must be a mapping",
     "not_a_mapping"),
    ("merge-missing-model", "merge {merge_missing_model} --out {out} --quiet", r"not found",
     "gone"),
    ("merge-negative-density", "merge {merge_negative_density} --out {out} --quiet", r"density",
     None),
    ("merge-nan-input", "merge {merge_nan_input} --out {out} --quiet", r"NaN", "nan"),
    ("merge-missing-role", MERGE.replace("interpolate", "safe_lora"),
     r"unaligned", None),
    ("merge-unknown-method", MERGE.replace("interpolate", "interpolat"), r"--method must be",
     None),
    ("merge-truncated", on(MERGE, finetuned="truncated"), r"truncated", "truncated"),
    ("merge-lying-header", on(MERGE, finetuned="overlap"), r"overlaps", "overlap"),
    ("merge-inf", on(MERGE, finetuned="inf"), r"Inf", "inf"),
    ("merge-vocab", on(MERGE, finetuned="small_vocab"), r"vocab_size differs", "small_vocab"),
    ("merge-wrong-shape", on(MERGE, finetuned="wrong_shape"), r"shapes differ", "wrong_shape"),
    ("merge-pickle", on(MERGE, finetuned="pickle"), r"--allow-pickle", "pickle"),
    ("merge-out-is-input", on(MERGE, out="aligned"), r"overwrite an input", "aligned"),
    ("merge-out-is-input-overwrite", on(MERGE, "--overwrite", out="finetuned"),
     r"overwrite an input", "finetuned"),
    ("merge-out-inside-input", on(MERGE, out="inside_finetuned"), r"overwrite an input",
     "finetuned"),
    ("merge-out-not-empty", on(MERGE, out="full"), r"not empty", "full"),
    ("merge-density-above-1", DENSE, r"density", None),
    ("merge-bad-shard-size", on(MERGE, "--out-shard-size 0"), r"size", None),
    # -- retrain
    ("retrain-empty-data", on(RETRAIN, pairs="empty"), r"empty file", "empty"),
    ("retrain-malformed-data", on(RETRAIN, pairs="malformed"), r"malformed JSON", "malformed"),
    ("retrain-binary-data", on(RETRAIN, pairs="binary"), r"not UTF-8", "binary"),
    ("retrain-csv-no-response", on(RETRAIN, pairs="no_answer_csv"), r"missing response field",
     "no_answer_csv"),
    ("retrain-bad-messages", on(RETRAIN, pairs="bad_messages"), r"one user turn",
     "bad_messages"),
    ("retrain-unknown-yaml-key", "retrain --config {retrain_unknown_key} --out {out} --quiet",
     r"unknown key 'learning_rate'", "retrain_unknown_key"),
    ("retrain-malformed-yaml", "retrain --config {malformed_yaml} --out {out} --quiet",
     r"not valid YAML", "malformed_yaml"),
    ("retrain-negative-lr", on(RETRAIN, "--lr -0.1"), r"--lr must be", None),
    ("retrain-zero-epochs", on(RETRAIN, "--epochs 0"), r"--epochs must be", None),
    ("retrain-pickle", on(RETRAIN, aligned="pickle"), r"--allow-pickle", "pickle"),
    ("retrain-nan", on(RETRAIN, aligned="nan"), r"NaN", "nan"),
    ("retrain-out-is-input", on(RETRAIN, "--overwrite", out="aligned"), r"overwrite an input",
     "aligned"),
    ("retrain-out-inside-input", on(RETRAIN, out="inside_aligned"), r"overwrite an input",
     "aligned"),
    ("retrain-out-not-empty", on(RETRAIN, out="full"), r"not empty", "full"),
    ("retrain-adapter-wrong-base", on(RETRAIN, "--adapter {adapter}", aligned="other_base"),
     r"do not fit base weight", "adapter"),
    # -- compare
    ("compare-unknown-yaml-key", "compare --config {compare_unknown_key} --out {out} --quiet",
     r"unknown key 'finetuned_model'", "compare_unknown_key"),
    ("compare-unknown-method", on(COMPARE, "--methods recovr"), r"recovr", None),
    ("compare-missing-model", on(COMPARE, finetuned="gone"), r"does not exist", "gone"),
    ("compare-nan", on(COMPARE, finetuned="nan"), r"NaN", "nan"),
    ("compare-vocab", on(COMPARE, finetuned="small_vocab"), r"vocab_size differs", "small_vocab"),
    ("compare-binary-harmful", on(COMPARE, harmful="binary"), r"not UTF-8", "binary"),
    ("compare-truncated", on(COMPARE, finetuned="truncated"), r"truncated", "truncated"),
    ("compare-out-not-empty", on(COMPARE, out="full"), r"not empty", "full"),
    # -- lab build
    ("lab-share-above-1", "lab build --size test --out {out} --harmful-share 1.5 --quiet",
     r"--harmful-share", None),
    ("lab-negative-seed", "lab build --size test --out {out} --seed -1 --quiet", r"--seed", None),
    ("lab-out-is-a-file", "lab build --size test --out {harmful} --quiet", r"is a file", "harmful"),
]
# fmt: on


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    models = build_models(root / "models")
    data = build_data(root / "data")
    paths = {**models, **data, **build_configs(root / "configs", models, data)}
    paths["gone"] = root / "gone"
    paths["models"] = root / "models"
    paths["inside_aligned"] = models["aligned"] / "sub"
    paths["inside_finetuned"] = models["finetuned"] / "merged"
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def world_hashes(world) -> dict[str, str]:
    return tree_hashes(world["root"])


def test_the_table_covers_every_command_with_at_least_40_cases():
    commands = {argv.split()[0] for _, argv, _, _ in CASES}
    assert commands == {"eval", "recover", "merge", "retrain", "compare", "lab"}
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("argv", "what", "where"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(
    world, world_hashes, tmp_path, argv, what, where
):
    outputs = tmp_path / "outputs"
    (outputs / "full").mkdir(parents=True)
    (outputs / "full" / "keep.txt").write_text("mine")
    paths = {**world, "out": outputs / "out", "full": outputs / "full"}
    args = [part.format(**{k: str(v) for k, v in paths.items()}) for part in argv.split()]
    before = tree_hashes(outputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a warning would be a line on a user's stderr
        result = CliRunner().invoke(main, args)

    assert result.exit_code == 2, (result.output, result.exception)
    lines = [str(w.message) for w in caught] + result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert re.search(what, lines[0]), lines[0]
    if where is not None:
        assert str(paths[where]) in lines[0], lines[0]
    assert tree_hashes(outputs) == before
    assert tree_hashes(world["root"]) == world_hashes


@pytest.mark.parametrize("argv", [RECOVER, MERGE], ids=["recover", "merge"])
def test_a_machine_without_the_memory_is_refused_before_loading(
    world, world_hashes, tmp_path, monkeypatch, argv
):
    monkeypatch.setattr(resources, "available_memory", lambda: 10**6)
    paths = {**world, "out": tmp_path / "out"}
    result = CliRunner().invoke(main, [a.format(**paths) for a in argv.split()])
    assert result.exit_code == 2
    command = argv.split()[0]
    assert re.fullmatch(
        rf"Error: not enough memory for {command}: needs ~[\d.]+ MB, 1\.0 MB available "
        r"\(use a smaller dtype or another machine\)\n",
        result.stderr,
    )
    assert list(tmp_path.iterdir()) == []
    assert tree_hashes(world["root"]) == world_hashes


@pytest.mark.parametrize(
    ("argv", "prefix"), [(RECOVER, "machine:      "), (MERGE, "needs: ")], ids=["recover", "merge"]
)
def test_dry_run_prints_what_the_run_needs(world, tmp_path, monkeypatch, argv, prefix):
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * 10**9)
    paths = {**world, "out": tmp_path / "out"}
    result = CliRunner().invoke(main, [a.format(**paths) for a in argv.split()] + ["--dry-run"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith(prefix))
    assert re.fullmatch(
        r"memory ~[\d.]+ MB \(8\.0 GB available\), disk ~[\d.]+ KB.*", line[len(prefix) :]
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        on(RECOVER, "--steps 1 --allow-pickle", finetuned="pickle"),
        on(MERGE, "--allow-pickle", finetuned="pickle"),
        on(EVAL, "--allow-pickle", aligned="pickle"),
    ],
    ids=["recover", "merge", "eval"],
)
def test_allow_pickle_reads_the_refused_pickle_checkpoint(world, world_hashes, tmp_path, argv):
    paths = {**world, "out": tmp_path / "out"}
    result = CliRunner().invoke(main, [a.format(**paths) for a in argv.split()])
    assert result.exit_code == 0, result.output
    assert tree_hashes(world["root"]) == world_hashes
