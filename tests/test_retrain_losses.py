"""Each regularizer's loss against a hand computation, on small random tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from safealign.command import OldSpelling
from safealign.retrain.critic import auroc, beta, ema
from safealign.retrain.divergence import (
    position_betas,
    reply_positions,
    token_nll,
    token_nll_kl,
)
from safealign.retrain.regularizers import (
    KL,
    LDIFS,
    SFT,
    AdaptiveKL,
    AdaptiveKLSettings,
    EpochKLSettings,
    KLSettings,
    LDIFSSettings,
    RegistryError,
    create,
    upgrade,
)
from safealign.retrain.regularizers.base import Run
from safealign.retrain.regularizers.divergence import EpochKL
from safealign.retrain.settings import RetrainSettings
from safealign.settings import SettingsError

B, T, V = 2, 5, 7


def batch(seed: int = 0):
    """Logits of model and reference, and labels: example 0 trains positions 2..4, example 1
    positions 3..4 (the first position is never predicted)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    labels[0, 2:] = ids[0, 2:]
    labels[1, 3:] = ids[1, 3:]
    inputs = {"input_ids": ids, "attention_mask": torch.ones(B, T), "labels": labels}
    return logits, ref, inputs


def trained(inputs):
    """(example, position predicting a trained token, the token), by hand."""
    labels = inputs["labels"]
    return [
        (b, t, int(labels[b, t + 1]))
        for b in range(B)
        for t in range(T - 1)
        if labels[b, t + 1] != -100
    ]


def hand_nll(logits, b, t, token):
    row = logits[b, t].tolist()
    return math.log(sum(math.exp(x) for x in row)) - row[token]


def hand_kl(p_logits, q_logits):
    """KL(p || q) from plain Python lists."""
    zp = math.log(sum(math.exp(x) for x in p_logits))
    zq = math.log(sum(math.exp(x) for x in q_logits))
    return sum(
        math.exp(a - zp) * ((a - zp) - (c - zq)) for a, c in zip(p_logits, q_logits, strict=True)
    )


def run() -> Run:
    return Run(None, None, None, None, RetrainSettings(), [], torch.device("cpu"))


def test_sft_is_the_token_sum_of_nll():
    logits, _, inputs = batch()
    loss, _ = SFT().loss(run(), inputs, SimpleNamespace(logits=logits), None)
    expected = sum(hand_nll(logits, b, t, k) for b, t, k in trained(inputs))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_adds_weighted_kl_per_trained_token(direction):
    logits, ref, inputs = batch(1)
    reg = KL(KLSettings(weight=0.3, direction=direction))
    loss, stats = reg.loss(
        run(), inputs, SimpleNamespace(logits=logits), SimpleNamespace(logits=ref)
    )
    expected = 0.0
    for b, t, k in trained(inputs):
        p, q = ref[b, t].tolist(), logits[b, t].tolist()
        kl = hand_kl(p, q) if direction == "forward" else hand_kl(q, p)
        expected += hand_nll(logits, b, t, k) + 0.3 * kl
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kl"] > 0


def test_token_wise_kl_is_qi_et_al_objective_with_beta_by_reply_position():
    logits, ref, inputs = batch(6)
    reg = KL(KLSettings(weight=0.3, form="token-wise", betas=(0.5, 2.0, 0.1)))
    loss, stats = reg.loss(
        run(), inputs, SimpleNamespace(logits=logits), SimpleNamespace(logits=ref)
    )
    expected, ratios = 0.0, []
    for b, t, k in trained(inputs):
        position = t if b == 0 else t - 1  # the replies start at t 1 and 2
        beta = (0.5, 2.0, 0.1)[min(position, 3) - 1]
        ratio = hand_nll(ref, b, t, k) - hand_nll(logits, b, t, k)  # log p / p_ref
        expected += 2 / beta * math.log(1 + math.exp(-beta * ratio))
        ratios.append(ratio)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["log_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)


def test_token_wise_gradient_is_nll_gradient_times_the_authors_weight():
    """Qi et al.'s code multiplies the NLL by 2 * (1 - sigmoid(beta * ratio)), detached: the
    same gradient, by hand d/dlogits = weight * (softmax - one-hot of the token)."""
    logits, ref, inputs = batch(7)
    reg = KL(KLSettings(weight=1.0, form="token-wise", betas=(0.5, 2.0)))
    loss, _ = reg.loss(run(), inputs, SimpleNamespace(logits=logits), SimpleNamespace(logits=ref))
    (grad,) = torch.autograd.grad(loss, logits)
    expected = torch.zeros_like(grad)
    for b, t, k in trained(inputs):
        position = t if b == 0 else t - 1  # the replies start at t 1 and 2
        beta = (0.5, 2.0)[min(position, 2) - 1]
        ratio = hand_nll(ref, b, t, k) - hand_nll(logits, b, t, k)
        weight = 2 * (1 - 1 / (1 + math.exp(-beta * ratio)))
        row = [math.exp(x) for x in logits[b, t].tolist()]
        for v in range(V):
            expected[b, t, v] = weight * (row[v] / sum(row) - (v == k))
    torch.testing.assert_close(grad, expected)


def test_reply_positions_restart_at_each_assistant_turn_and_betas_repeat_the_last():
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9], [-100, -100, -100, 1, 2, 3, 4, 5]])
    positions = reply_positions(labels)
    assert positions.tolist() == [1, 2, 1, 2, 3, 1, 2, 3, 4, 5]
    assert position_betas(positions, (0.5, 2.0, 0.1)).tolist() == pytest.approx(
        [0.5, 2.0, 0.5, 2.0, 0.1, 0.5, 2.0, 0.1, 0.1, 0.1]
    )


def test_kl_form_and_betas_are_checked():
    with pytest.raises(SettingsError, match="kl:form must be one of plain, token-wise, got 'deep'"):
        create("kl:form=deep")
    with pytest.raises(SettingsError, match="kl:betas must be > 0, got 0"):
        create("kl:form=token-wise,betas=0")
    with pytest.raises(SettingsError, match="kl:betas needs at least one value"):
        create("kl:form=token-wise,betas=[]")
    reg = create("kl:form=token-wise,betas=2")
    assert (reg.settings.form, reg.settings.betas) == ("token-wise", (2.0,))
    assert create("kl:betas=[1.0, 0.2]").settings.betas == (1.0, 0.2)


def test_kl_direction_defaults_per_regularizer_and_the_old_setting_overrides_all():
    """kl and epoch-kl default to reverse KL(p || p_ref), adaptive-kl to forward (each measured
    on the lab, benchmarks/results/retrain_direction_*.json); the former --kl-direction still
    sets all three, with a warning."""
    assert create("kl").settings.direction == "reverse"
    assert create("epoch-kl").settings.direction == "reverse"
    assert create("adaptive-kl").settings.direction == "forward"
    for direction in ("forward", "reverse"):
        for name in ("kl", "epoch-kl", "adaptive-kl"):
            with pytest.warns(OldSpelling, match=f"use regularizer='{name}:direction="):
                spec = upgrade(name, {"kl_direction": direction})
            assert create(spec).settings.direction == direction
    assert create("adaptive-kl:direction=reverse").settings.direction == "reverse"


def dense_kl(rows: torch.Tensor, ref: torch.Tensor, direction: str) -> torch.Tensor:
    """KL per row by its definition: forward KL(p_ref || p), reverse KL(p || p_ref)."""
    p, q = rows.softmax(-1), ref.softmax(-1)
    if direction == "reverse":
        return (p * (p.log() - q.log())).sum(-1)
    return (q * (q.log() - p.log())).sum(-1)


def test_chunked_kl_equals_dense_in_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(37, 11, generator=g, dtype=torch.float64)
    ref = torch.randn(37, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (37,), generator=g)
    for direction in ("forward", "reverse"):
        a = rows.clone().requires_grad_(True)
        b = rows.clone().requires_grad_(True)
        _, dense = token_nll_kl(a, ref, targets, direction=direction, chunk=None)
        _, chunked = token_nll_kl(b, ref, targets, direction=direction, chunk=5)
        (dense * torch.arange(37)).sum().backward()
        (chunked * torch.arange(37)).sum().backward()
        assert torch.allclose(dense, chunked, rtol=0, atol=1e-12)
        assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(dense, dense_kl(rows, ref, direction).float())


def test_fused_nll_and_kl_equal_the_separate_ones_chunked_or_dense():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(23, 13, generator=g, dtype=torch.float64)
    ref = torch.randn(23, 13, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 13, (23,), generator=g)
    grads = []
    for chunk in (None, 4):
        a = rows.clone().requires_grad_(True)
        nll, kl = token_nll_kl(a, ref, targets, direction="reverse", chunk=chunk)
        torch.testing.assert_close(nll, token_nll(rows, targets), rtol=0, atol=1e-6)
        torch.testing.assert_close(kl, dense_kl(rows, ref, "reverse").float(), rtol=0, atol=1e-6)
        (nll.sum() + 2 * kl.sum()).backward()
        grads.append(a.grad)
    assert torch.equal(grads[0], grads[1])


def test_kl_of_two_known_distributions_in_both_directions():
    """p = (1/2, 1/2) and q = (1/4, 3/4): KL(p || q) = ln 2 / 2 + ln(2/3) / 2 and
    KL(q || p) = ln(1/2) / 4 + 3 ln(3/2) / 4, in nats."""
    p = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    targets = torch.zeros(1, dtype=torch.long)
    _, forward = token_nll_kl(q, p, targets, direction="forward")  # KL(p_ref || p_model)
    _, reverse = token_nll_kl(q, p, targets, direction="reverse")  # KL(p_model || p_ref)
    assert forward.item() == pytest.approx(math.log(2) / 2 + math.log(2 / 3) / 2, rel=1e-6)
    assert reverse.item() == pytest.approx(math.log(0.5) / 4 + 3 * math.log(1.5) / 4, rel=1e-6)


def test_adaptive_kl_weighs_each_example_by_its_beta():
    logits, ref, inputs = batch(2)
    inputs["index"] = torch.tensor([1, 0])
    reg = AdaptiveKL(AdaptiveKLSettings(beta_min=0.2, beta_max=0.8))
    reg.table = torch.tensor([0.25, 1.0])  # example 1 of the data set is unsafe
    loss, stats = reg.loss(
        run(), inputs, SimpleNamespace(logits=logits), SimpleNamespace(logits=ref)
    )
    betas = {0: 0.8, 1: 0.2 + 0.6 * 0.25}  # batch row 0 is data example 1
    expected = 0.0
    for b, t, k in trained(inputs):
        kl = hand_kl(ref[b, t].tolist(), logits[b, t].tolist())
        expected += (1 - betas[b]) * hand_nll(logits, b, t, k) + betas[b] * kl
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["beta"] == pytest.approx((0.8 + 0.35) / 2)


def test_beta_mapping_is_clamped_and_ema_smooths_in_order():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert beta(s, 0.0, 1.0).tolist() == pytest.approx([0.1, 0.5, 0.9])
    assert beta(s, 0.2, 0.6).tolist() == pytest.approx([0.2, 0.4, 0.6])
    smoothed, last = ema(torch.tensor([1.0, 0.0, 0.0]), None, 0.5)
    assert smoothed.tolist() == pytest.approx([1.0, 0.5, 0.25])
    smoothed, last = ema(torch.tensor([1.0]), last, 0.5)
    assert (smoothed.tolist(), last) == (pytest.approx([0.625]), pytest.approx(0.625))


def test_auroc_by_hand():
    assert auroc([0.9, 0.8, 0.1, 0.8], [1, 1, 0, 0]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)


def test_ldifs_is_mean_squared_distance_of_unit_features():
    logits, _, inputs = batch(4)
    g = torch.Generator().manual_seed(5)
    hidden = [torch.randn(B, T, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    ref_hidden = [torch.randn(B, T, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    reg = LDIFS(LDIFSSettings(weight=2.0, layers=(1, 2)))
    out = SimpleNamespace(logits=logits, hidden_states=hidden)
    loss, _ = reg.loss(run(), inputs, out, SimpleNamespace(hidden_states=ref_hidden))
    expected = 0.0
    for b, t, k in trained(inputs):
        dist = 0.0
        for layer in (1, 2):
            h, r = hidden[layer][b, t], ref_hidden[layer][b, t]
            dist += float(((h / h.norm() - r / r.norm()) ** 2).sum()) / 2
        expected += hand_nll(logits, b, t, k) + 2.0 * dist
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_epoch_kl_weight_is_gamma_to_the_epoch_and_reference_moves_at_epoch_starts():
    refreshed = []
    r = run()
    r.reference = SimpleNamespace(refresh=lambda: refreshed.append(True))
    reg = EpochKL(EpochKLSettings(gamma=0.5))
    for epoch in (0, 0, 1, 1, 2):
        reg.on_epoch_start(r, epoch)
        assert reg.current_weight() == 0.5**epoch
    assert len(refreshed) == 2


def test_unknown_option_is_refused_naming_the_options():
    with pytest.raises(RegistryError, match="no option 'wieght' \\(options: weight, direction"):
        create("kl:wieght=1")
    with pytest.raises(RegistryError, match="unknown regularizer 'klx'"):
        create("klx")
    assert create("kl:weight=2").settings.weight == 2.0


def test_schedule_is_seeded_and_splits_rounds_between_processes():
    from safealign.retrain.data import schedule

    one = schedule(10, batch_size=2, grad_accum=2, epochs=2, seed=3)
    assert one == schedule(10, batch_size=2, grad_accum=2, epochs=2, seed=3)
    assert [s.epoch for s in one] == [0, 0, 0, 1, 1, 1]
    assert sorted(i for s in one[:3] for m in s.micro for i in m) == list(range(10))
    ranks = [
        schedule(10, batch_size=2, grad_accum=1, epochs=1, seed=3, rank=r, world=2) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 2  # the incomplete last round of 2 is dropped
    seen = [i for steps in ranks for s in steps for m in s.micro for i in m]
    assert len(seen) == len(set(seen)) == 8
