"""``--schedule paper`` and ``guarded`` against dense reimplementations, written here: the
authors' loop, and the guarded rules as recover's documentation states them.

The references below use nothing of ``safealign.recover``: whole models, whole gradients,
boolean masks, a full sort. The utility check is scripted (the same script drives both), so
the tests pin each schedule: restarts, which elements are restored and rolled back, how many,
the kept step and the written state.
"""

from __future__ import annotations

import math

import pytest
import torch
from recover_support import HARMFUL, make_pair
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from safealign.recover import RecoverInputs, RecoverSettings, recover
from safealign.recover.guard import Check, StepGuard

TRAIN = [
    {"prompt": p, "answer": "5"} for p in ("sum of 2 and 3", "what is 7 + 2", "sum of 4 and 1")
]
CHECK = [{"prompt": "what is 1 + 1", "answer": "2"}]
RUN = {
    "layer": 3,
    "rate": 0.01,
    "steps": 7,
    "warmup": 2,
    "check_every": 2,
    "rollback_rate": 0.2,
    "grad_batch_size": 4,
    "batch_size": 8,
    "max_new_tokens": 2,
}


# --- the reference, dense -------------------------------------------------------------------


def last_states(model, tokenizer, prompts, layer):
    """Last-token hidden states after ``layer`` blocks, prompts in the chat template, left
    padded, position ids counting real tokens."""
    rows = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        add = not text.startswith(tokenizer.bos_token)
        rows.append(tokenizer(text, add_special_tokens=add)["input_ids"])
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True
    )
    return out.hidden_states[layer][:, -1, :].float()


def centroid(model, tokenizer, prompts, layer):
    with torch.no_grad():
        return last_states(model, tokenizer, prompts, layer).mean(0)


def gradient(model, tokenizer, prompts, layer, target, batch):
    """Sum over batches of the gradient of -cos(batch mean state, target), from zero."""
    model.zero_grad(set_to_none=False)
    for start in range(0, len(prompts), batch):
        mean = last_states(model, tokenizer, prompts[start : start + batch], layer).mean(0)
        (-torch.nn.functional.cosine_similarity(mean, target, dim=0)).backward()
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for n, p in model.named_parameters()
    }


def top(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], count: int):
    """Boolean masks of the ``count`` largest scores among the masked elements."""
    names = list(masks)
    flat = torch.cat([torch.where(masks[n], scores[n], -1.0).flatten() for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices[
        : min(count, int((flat >= 0).sum()))
    ]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    out, offset = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = chosen[offset : offset + size].view_as(masks[n])
        offset += size
    return out


def setup(aligned_dir, finetuned_dir):
    """(tokenizer, A's parameters, the working model (B), eligible names, k, A's harmful
    direction): every decoder parameter below the layer but norms; k over all of them."""
    layer = RUN["layer"]
    tokenizer = AutoTokenizer.from_pretrained(finetuned_dir)
    model_a = LlamaForCausalLM.from_pretrained(aligned_dir)
    work = LlamaForCausalLM.from_pretrained(finetuned_dir)
    decoder = [n for n, _ in work.named_parameters() if n.startswith("model.layers.")]
    eligible = [n for n in decoder if int(n.split(".")[2]) < layer and "norm" not in n]
    k = math.ceil(RUN["rate"] * sum(work.get_parameter(n).numel() for n in decoder))
    direction = centroid(model_a, tokenizer, HARMFUL, layer)
    return tokenizer, dict(model_a.named_parameters()), work, eligible, k, direction


def run_recover(aligned, finetuned, out, schedule: str = "paper", **overrides):
    """``recover`` under ``schedule`` with the test's settings (``overrides`` on top)."""
    inputs = RecoverInputs(aligned, finetuned, harmful=HARMFUL, task=CHECK, task_train=TRAIN)
    return recover(inputs, RecoverSettings(schedule=schedule, **{**RUN, **overrides}), out)


def dense_paper(aligned_dir, finetuned_dir, script):
    """The authors' loop; returns (per-step (restored, rolled back), kept step, kept state)."""
    layer, batch = RUN["layer"], RUN["grad_batch_size"]
    tokenizer, a, work, eligible, k, direction = setup(aligned_dir, finetuned_dir)
    params = dict(work.named_parameters())
    model_b = LlamaForCausalLM.from_pretrained(finetuned_dir)
    b = {n: p.detach().clone() for n, p in model_b.named_parameters()}
    train = [e["prompt"] for e in TRAIN]
    task_centroid = centroid(model_b, tokenizer, train, layer)
    checks = iter(script)
    total = {n: torch.zeros_like(params[n]) for n in eligible}

    def step(rollback: bool):
        g = gradient(work, tokenizer, HARMFUL, layer, direction, batch)
        for n in eligible:
            total[n] = g[n] if rollback else total[n] + g[n]
        w = {n: params[n].detach() for n in eligible}
        agree = {n: (w[n] != a[n]) & (total[n].sign() == (w[n] - a[n]).sign()) for n in eligible}
        picked = top({n: total[n].abs() for n in eligible}, agree, k)
        with torch.no_grad():
            for n in eligible:
                params[n][picked[n]] = a[n][picked[n]]
        restored = sum(int(m.sum()) for m in picked.values())
        if not rollback:
            return restored, 0
        g = gradient(work, tokenizer, train, layer, task_centroid, batch)
        w = {n: params[n].detach() for n in eligible}
        back = {
            n: picked[n] & (w[n] != b[n]) & (g[n].sign() == (w[n] - b[n]).sign()) for n in eligible
        }
        count = math.ceil(RUN["rollback_rate"] * sum(int(m.sum()) for m in back.values()))
        chosen = top({n: g[n].abs() for n in eligible}, back, count)
        with torch.no_grad():
            for n in eligible:
                params[n][chosen[n]] = b[n][chosen[n]]
        return restored, sum(int(m.sum()) for m in chosen.values())

    counts = [step(False) for _ in range(RUN["warmup"])]
    snapshot = {n: params[n].detach().clone() for n in eligible}
    kept, kept_state, rollback = RUN["warmup"], snapshot, False
    if not next(checks):
        with torch.no_grad():
            for n in eligible:
                params[n].copy_(b[n])
        kept, kept_state, rollback, counts = 0, {n: b[n] for n in eligible}, True, []
    for s in range(RUN["warmup"] + 1 if not rollback else 1, RUN["steps"] + 1):
        if s > RUN["steps"] // RUN["check_every"] * RUN["check_every"]:
            break
        counts.append(step(rollback))
        if s % RUN["check_every"] == 0:
            if not next(checks):
                break
            kept, kept_state = s, {n: params[n].detach().clone() for n in eligible}
    return counts, kept, kept_state


def dense_guarded(aligned_dir, finetuned_dir, script):
    """The guarded rules: harmful gradients summed over every step; each step restores the
    top k by |sum| among elements not at A's value, not blocked, whose sum's sign matches
    w - w_A; every step from the warm-up's last on is checked; a failing step gives back
    min(ceil(rollback_rate x its restores), those qualifying) of its own restores, the largest
    |g| of the task loss first among those where sign(g) == sign(w - w_B), blocks them for
    good and is checked again; the last step that held is kept. Returns (per-step (restored,
    rolled back), kept step, kept state)."""
    layer, batch = RUN["layer"], RUN["grad_batch_size"]
    tokenizer, a, work, eligible, k, direction = setup(aligned_dir, finetuned_dir)
    params = dict(work.named_parameters())
    b = {n: params[n].detach().clone() for n in eligible}
    train = [e["prompt"] for e in TRAIN]
    task_centroid = centroid(work, tokenizer, train, layer)
    checks = iter(script)
    total = {n: torch.zeros_like(params[n]) for n in eligible}
    blocked = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in eligible}
    counts, kept, kept_state = [], 0, b
    for s in range(1, RUN["steps"] + 1):
        g = gradient(work, tokenizer, HARMFUL, layer, direction, batch)
        w = {n: params[n].detach() for n in eligible}
        for n in eligible:
            total[n] = total[n] + g[n]
        agree = {
            n: (w[n] != a[n]) & ~blocked[n] & (total[n].sign() == (w[n] - a[n]).sign())
            for n in eligible
        }
        picked = top({n: total[n].abs() for n in eligible}, agree, k)
        with torch.no_grad():
            for n in eligible:
                params[n][picked[n]] = a[n][picked[n]]
        restored = sum(int(m.sum()) for m in picked.values())
        holds, rolled = (next(checks) if s >= RUN["warmup"] else None), 0
        if holds is False:
            g = gradient(work, tokenizer, train, layer, task_centroid, batch)
            w = {n: params[n].detach() for n in eligible}
            back = {
                n: picked[n] & (w[n] != b[n]) & (g[n].sign() == (w[n] - b[n]).sign())
                for n in eligible
            }
            qualifying = sum(int(m.sum()) for m in back.values())
            count = min(math.ceil(RUN["rollback_rate"] * restored), qualifying)
            chosen = top({n: g[n].abs() for n in eligible}, back, count)
            with torch.no_grad():
                for n in eligible:
                    params[n][chosen[n]] = b[n][chosen[n]]
                    blocked[n] |= chosen[n]
            rolled, holds = sum(int(m.sum()) for m in chosen.values()), next(checks)
        counts.append((restored, rolled))
        if holds:
            kept, kept_state = s, {n: params[n].detach().clone() for n in eligible}
    return counts, kept, kept_state


# --- the comparison -------------------------------------------------------------------------


def scripted_checks(monkeypatch, script):
    """StepGuard.check answers from ``script`` in call order."""
    answers = iter(script)

    def check(self, work):
        holds = next(answers)
        return Check(utility=1.0 if holds else 0.0, over_refusal=None, drift=None, holds=holds)

    monkeypatch.setattr(StepGuard, "check", check)


@pytest.mark.parametrize(
    "script",
    [
        pytest.param((False, True, True, False), id="warm-up fails: restart, kept 4"),
        pytest.param((True, True, False), id="warm-up holds: accumulate, kept 4"),
    ],
)
def test_paper_schedule_matches_dense_reference(tmp_path, monkeypatch, script):
    aligned, finetuned = make_pair(tmp_path, noise=0.05, attention_bias=True)
    scripted_checks(monkeypatch, script)
    result = run_recover(aligned, finetuned, tmp_path / "out")
    counts, kept, state = dense_paper(aligned, finetuned, script)
    run = result.run
    restarted = not script[0]
    steps = [s for s in run.steps if s.phase != "warm-up"] if restarted else run.steps
    assert [(s.restored, s.rolled_back) for s in steps] == counts
    assert all(s.rolled_back > 0 for s in steps) == restarted
    assert run.kept_step == kept == 4
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = load_file(str(finetuned / "model.safetensors"))
    for name, expected in state.items():
        assert torch.equal(out[name], expected), name
    # biases are restored, norms never are
    assert any(not torch.equal(out[n], b[n]) for n in state if n.endswith("_proj.bias"))
    assert all(torch.equal(out[n], b[n]) for n in out if "norm" in n)


#: Each check's answer in call order: steps 2-7 checked, a failing one checked again after
#: its rollback (step 3 then holds, steps 5 and 7 still fail).
GUARDED_SCRIPT = (True, False, True, True, False, False, True, False, False)


def test_guarded_schedule_matches_dense_reference(tmp_path, monkeypatch):
    aligned, finetuned = make_pair(tmp_path, noise=0.05, attention_bias=True)
    scripted_checks(monkeypatch, GUARDED_SCRIPT)
    result = run_recover(aligned, finetuned, tmp_path / "out", schedule="guarded")
    counts, kept, state = dense_guarded(aligned, finetuned, GUARDED_SCRIPT)
    run = result.run
    assert [(s.restored, s.rolled_back) for s in run.steps] == counts
    assert [s.step for s in run.steps if s.rolled_back] == [3, 5, 7]
    assert run.kept_step == kept == 6
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, expected in state.items():
        assert torch.equal(out[name], expected), name


def test_rolled_back_elements_can_be_restored_again(tmp_path, monkeypatch):
    """Under paper nothing is blocked: an element a rollback gave back is restored again by a
    later step (the restart's steps logged in order)."""
    import safealign.recover.working as working

    aligned, finetuned = make_pair(tmp_path, noise=0.05)
    scripted_checks(monkeypatch, (False, True, True, True))
    log: list[tuple[str, dict]] = []
    restore, roll_back = working.WorkingModel.restore, working.WorkingModel.roll_back

    def logged_restore(self, picked):
        out = restore(self, picked)
        log.append(("restore", {n: set(i.tolist()) for n, i in out.items()}))
        return out

    def logged_roll_back(self, *args, **kwargs):
        out = roll_back(self, *args, **kwargs)
        log.append(("rollback", {n: set(i.tolist()) for n, i in out.items()}))
        return out

    monkeypatch.setattr(working.WorkingModel, "restore", logged_restore)
    monkeypatch.setattr(working.WorkingModel, "roll_back", logged_roll_back)
    run_recover(aligned, finetuned, tmp_path / "out", rate=0.02, rollback_rate=0.5)
    again = 0
    for i, (kind, rolled) in enumerate(log):
        if kind != "rollback":
            continue
        later = [r for k, r in log[i + 1 :] if k == "restore"]
        again += sum(len(idx & r.get(n, set())) for n, idx in rolled.items() for r in later)
    assert again > 0


def dense_accumulated(aligned_dir, finetuned_dir, steps: int, sum_dtype: torch.dtype):
    """Restore-only steps on the bf16 model, its gradients summed in ``sum_dtype``; the
    eligible tensors after the last step."""
    layer = RUN["layer"]
    tokenizer, a, work, eligible, k, direction = setup(aligned_dir, finetuned_dir)
    params = dict(work.named_parameters())
    total = {n: torch.zeros(params[n].shape, dtype=sum_dtype) for n in eligible}
    for _ in range(steps):
        for start in range(len(HARMFUL)):  # batches of one: one gradient per prompt
            g = gradient(work, tokenizer, HARMFUL[start : start + 1], layer, direction, 1)
            for n in eligible:
                total[n] += g[n].to(sum_dtype)
        w = {n: params[n].detach() for n in eligible}
        agree = {
            n: (w[n] != a[n]) & (total[n].float().sign() == (w[n] - a[n]).float().sign())
            for n in eligible
        }
        picked = top({n: total[n].float().abs() for n in eligible}, agree, k)
        with torch.no_grad():
            for n in eligible:
                params[n][picked[n]] = a[n][picked[n]]
    return {n: params[n].detach().clone() for n in eligible}


def test_bf16_model_sums_gradients_in_fp32(tmp_path):
    """A bf16 checkpoint's per-batch gradients are summed in fp32: the restored elements are
    those of the dense loop summing the same gradients in fp32, not in bf16 (which, on this
    model, picks other elements)."""
    aligned, finetuned = make_pair(tmp_path, noise=0.05, dtype=torch.bfloat16)
    steps = 4
    settings = RecoverSettings(schedule="paper", **{**RUN, "steps": steps, "grad_batch_size": 1})
    recover(RecoverInputs(aligned, finetuned, harmful=HARMFUL), settings, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    fp32 = dense_accumulated(aligned, finetuned, steps, torch.float32)
    bf16 = dense_accumulated(aligned, finetuned, steps, torch.bfloat16)
    assert any(not torch.equal(fp32[n], bf16[n]) for n in fp32)  # the sum's precision matters
    for name, expected in fp32.items():
        assert out[name].dtype == torch.bfloat16  # written in the checkpoint's dtype
        assert torch.equal(out[name], expected), name
