"""A ``recover`` and a ``merge`` killed at random points (SIGKILL, SIGINT and SIGTERM) leave
either no destination or a complete, loadable one, never touch their inputs, and after SIGINT or
SIGTERM leave no temporary folder; what a SIGKILL leaves is removed by the next write to the
same output.

Cheap by design: the inputs are shared, and runs are forked from one "zygote" process that
imported the ``safealign`` entry point once (``safealign.cli:main``, run with the same argv as
the console script), so a run costs its own work, not Python's start-up. Each command is timed
once uninterrupted; kill times are drawn from a seeded RNG over that duration.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from bad_input_support import tree_hashes
from recover_support import HARMFUL, TASK_PROMPTS, make_pair
from safetensors.torch import load_file

RUNS = 21  # per command, SIGKILL, SIGINT and SIGTERM in turn
SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)

ZYGOTE = r"""
import json, os, signal, sys
import safealign.merge.engine, safealign.recover.api  # the work is imported once, here
import transformers.models.llama.modeling_llama
from safealign.cli import main

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = 1
        try:
            main(request["argv"], prog_name="safealign")
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status}), flush=True)
"""


class Zygote:
    """A process that forks one ``safealign`` run per request and reports its pid and status."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, argv: list[str], log: Path, kill: tuple[float, int] | None = None) -> dict:
        """Run ``safealign ARGV``; with ``kill=(seconds, signal)`` send the signal then."""
        self.process.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        start = time.perf_counter()
        pid = json.loads(self.process.stdout.readline())["pid"]
        if kill is not None:
            time.sleep(kill[0])
            try:
                os.kill(pid, kill[1])
            except ProcessLookupError:
                pass
        status = json.loads(self.process.stdout.readline())["status"]
        return {"pid": pid, "status": status, "seconds": time.perf_counter() - start}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    process = Zygote()
    yield process
    process.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    aligned, finetuned = make_pair(root, layers=2, hidden=32)
    harmful = root / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "answer": "5"}) + "\n" for p in TASK_PROMPTS))
    return {
        "root": root,
        "aligned": aligned,
        "finetuned": finetuned,
        "harmful": harmful,
        "task": task,
    }


def _argv(command: str, inputs: dict[str, Path], out: Path) -> list[str]:
    models = ["--aligned", str(inputs["aligned"]), "--finetuned", str(inputs["finetuned"])]
    if command == "recover":
        data = ["--harmful", str(inputs["harmful"]), "--task", str(inputs["task"])]
        return ["recover", *models, *data, "--steps", "3", "--out", str(out), "--overwrite"]
    return ["merge", "--method", "interpolate", *models, "--out", str(out), "--overwrite",
            "--out-shard-size", "40KB", "--quiet"]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _check_complete(out: Path, reference: dict[str, torch.Tensor]) -> None:
    """The destination loads as a model and holds exactly the uninterrupted run's weights."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    weights = _weights(out)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in reference)


def _leftovers(parent: Path, out: Path, pid: int | None = None) -> list[str]:
    tag = f"-{pid}-" if pid is not None else "-"
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.") and tag in p.name
    )


@pytest.mark.parametrize("command", ["recover", "merge"])
def test_a_killed_run_leaves_no_destination_or_a_complete_one(zygote, inputs, tmp_path, command):
    hashes = tree_hashes(inputs["root"])
    reference_out = tmp_path / "reference"
    for _ in range(2):  # the second run is the one timed: caches are warm by then
        timed = zygote.run(_argv(command, inputs, reference_out), tmp_path / "reference.log")
        assert timed["status"] == 0, (tmp_path / "reference.log").read_text()
    reference = _weights(reference_out)

    out = tmp_path / "out"
    rng = random.Random(f"{command}-11")
    outcomes = Counter()
    for run in range(RUNS):
        sig = SIGNALS[run % len(SIGNALS)]
        if run % 4 < 2:  # half the runs write a new output, half replace a complete one
            shutil.rmtree(out, ignore_errors=True)
        else:
            shutil.copytree(reference_out, out, dirs_exist_ok=True)
        log = tmp_path / f"run{run}.log"
        kill = (rng.uniform(0, timed["seconds"]), sig)
        result = zygote.run(_argv(command, inputs, out), log, kill)
        killed = os.WIFSIGNALED(result["status"])
        code = None if killed else os.WEXITSTATUS(result["status"])
        # 1: click's "Aborted!" on SIGINT or SIGTERM (our commands turn it into a
        # KeyboardInterrupt); 2: torch turns a KeyboardInterrupt that lands while
        # it converts a Python list into a ValueError ("could not determine the shape ...")
        assert killed or code in (0, 1) or (code == 2 and sig != signal.SIGKILL), log.read_text()
        outcomes["killed" if killed else "interrupted" if code == 1 else "finished"] += 1
        outcomes["complete" if out.exists() else "absent"] += 1
        if out.exists():
            _check_complete(out, reference)
        if sig != signal.SIGKILL:
            assert _leftovers(tmp_path, out, result["pid"]) == [], log.read_text()
        assert tree_hashes(inputs["root"]) == hashes

    # One more uninterrupted run cleans what SIGKILLs left and writes a complete output.
    last = zygote.run(_argv(command, inputs, out), tmp_path / "last.log")
    assert last["status"] == 0, (tmp_path / "last.log").read_text()
    assert _leftovers(tmp_path, out) == []
    _check_complete(out, reference)
    assert tree_hashes(inputs["root"]) == hashes
    # The kill times reached into the runs: some were stopped before they finished.
    assert outcomes["killed"] + outcomes["interrupted"] > 0, outcomes
