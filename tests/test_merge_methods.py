"""Merge methods against their closed forms, on small random tensors (numbers, not shapes)."""

from __future__ import annotations

import math

import pytest
import torch

from safealign.merge.methods import METHODS, LayerScore, LowRank, MergeParams
from safealign.merge.methods.lowrank import cosine, inner, norm, project

LAYER = "model.layers.0.self_attn.q_proj.weight"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def params(method, seed=0, selected=False, per_model=None, **overrides):
    declared = METHODS.get(method).parameters + METHODS.get(method).tensor_parameters
    values = {p.name: p.default for p in declared}
    values.update(overrides)
    return MergeParams(values, per_model or {}, seed=seed, selected=selected)


def run(method, tensors, base=None, name=LAYER, **kw):
    return METHODS.create(method).merge(name, tensors, base, params(method, **kw))


# --- standard methods ---------------------------------------------------------------------


def test_linear_normalized_and_plain():
    x, y = rand(4, 5, seed=1), rand(4, 5, seed=2)
    weights = {"x": {"weight": 0.3}, "y": {"weight": 0.9}}
    out = run("linear", {"x": x, "y": y}, per_model=weights)
    torch.testing.assert_close(out, (0.3 * x + 0.9 * y) / 1.2)
    out = run("linear", {"x": x, "y": y}, per_model=weights, normalize=False)
    torch.testing.assert_close(out, 0.3 * x + 0.9 * y)


def test_task_arithmetic_with_lambda_and_normalize():
    base, x, y = rand(6, 3, seed=0), rand(6, 3, seed=1), rand(6, 3, seed=2)
    weights = {"x": {"weight": 0.5}, "y": {"weight": -0.25}}
    out = run("task_arithmetic", {"x": x, "y": y}, base, per_model=weights)
    torch.testing.assert_close(out, base + 0.5 * (x - base) - 0.25 * (y - base))
    out = run("task_arithmetic", {"x": x, "y": y}, base, per_model=weights, **{"lambda": 2.0})
    torch.testing.assert_close(out, base + 2.0 * (0.5 * (x - base) - 0.25 * (y - base)))
    out = run("task_arithmetic", {"x": x, "y": y}, base, per_model=weights, normalize=True)
    torch.testing.assert_close(out, base + (0.5 * (x - base) - 0.25 * (y - base)) / 0.25)


def test_ties_matches_elementwise_definition():
    base, x, y, z = (rand(7, 9, seed=s) for s in range(4))
    weights = {"x": 1.0, "y": 0.5, "z": 2.0}
    density = 0.4
    per_model = {m: {"weight": w, "density": density} for m, w in weights.items()}
    out = run("ties", {"x": x, "y": y, "z": z}, base, per_model=per_model)

    expected = base.clone()
    trimmed = {}
    for m, t in {"x": x, "y": y, "z": z}.items():
        delta = (t - base).flatten()
        k = int(density * delta.numel())
        threshold = delta.abs().sort(descending=True).values[k - 1]
        trimmed[m] = torch.where(delta.abs() >= threshold, delta, 0.0)
    for i in range(base.numel()):
        contributions = {m: weights[m] * trimmed[m][i].item() for m in weights}
        sign = 1.0 if sum(contributions.values()) >= 0 else -1.0
        agreeing = [m for m, c in contributions.items() if c != 0 and math.copysign(1, c) == sign]
        if agreeing:
            total = sum(contributions[m] for m in agreeing)
            expected.view(-1)[i] += total / sum(weights[m] for m in agreeing)
    torch.testing.assert_close(out, expected)


def test_dare_reproducible_under_seed_and_rescaled():
    base, x, y = rand(32, 32, seed=0), rand(32, 32, seed=1), rand(32, 32, seed=2)
    per_model = {"x": {"weight": 1.0, "density": 0.3}, "y": {"weight": 0.7, "density": 0.3}}
    tensors = {"x": x, "y": y}
    first = run("dare_linear", tensors, base, per_model=per_model, seed=7)
    again = run("dare_linear", dict(reversed(tensors.items())), base, per_model=per_model, seed=7)
    other = run("dare_linear", tensors, base, per_model=per_model, seed=8)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)

    single = {"x": {"weight": 1.0, "density": 0.3}}
    kept = run("dare_linear", {"x": x}, base, per_model=single, seed=3) - base
    delta = x - base
    share = (kept != 0).float().mean().item()
    assert 0.2 < share < 0.4
    nonzero = kept != 0
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum())
    ratio = kept[nonzero] / delta[nonzero]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    plain = run("dare_linear", {"x": x}, base, per_model=single, seed=3, rescale=False) - base
    torch.testing.assert_close(plain[nonzero], delta[nonzero])


def test_dare_ties_at_full_density_is_ties():
    base, x, y = rand(5, 8, seed=0), rand(5, 8, seed=1), rand(5, 8, seed=2)
    per_model = {"x": {"weight": 1.0}, "y": {"weight": 0.6}}
    ties = run("ties", {"x": x, "y": y}, base, per_model=per_model)
    dare = run("dare_ties", {"x": x, "y": y}, base, per_model=per_model, normalize=True)
    torch.testing.assert_close(ties, dare)


def test_slerp_closed_form_per_row():
    base = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    other = torch.tensor([[0.0, 2.0], [4.0, 4.0], [0.0, -1.0]])
    t = 0.3
    out = run("slerp", {"o": other}, base, t=t)
    theta = math.pi / 2  # row 0: orthogonal, norms 1 and 2
    row0 = math.sin((1 - t) * theta) * base[0] + math.sin(t * theta) * other[0]
    torch.testing.assert_close(out[0], row0)
    torch.testing.assert_close(out[1], (1 - t) * base[1] + t * other[1])  # colinear: lerp
    torch.testing.assert_close(out[2], (1 - t) * base[2] + t * other[2])  # antipodal: lerp
    torch.testing.assert_close(run("slerp", {"o": other}, base, t=0.0), base)
    torch.testing.assert_close(run("slerp", {"o": other}, base, t=1.0), other)


def test_slerp_equal_norm_rows_turn_by_fraction_t_of_the_angle():
    base, other = rand(4, 16, seed=1), rand(4, 16, seed=2)
    other = other / other.norm(dim=1, keepdim=True) * base.norm(dim=1, keepdim=True)
    out = run("slerp", {"o": other}, base, t=0.25)
    for i in range(4):
        a, b, m = base[i], other[i], out[i]
        full = torch.acos(torch.dot(a, b) / (a.norm() * b.norm()))
        part = torch.acos(torch.dot(a, m) / (a.norm() * m.norm()))
        torch.testing.assert_close(part, 0.25 * full, atol=1e-4, rtol=1e-4)


# --- safety family ---------------------------------------------------------------------------


def alignment_matrix(aligned, unaligned):
    v = aligned - unaligned
    return v @ v.T / torch.linalg.matrix_norm(v)


def dense_rho(aligned, unaligned, update):
    c_update = alignment_matrix(aligned, unaligned) @ update
    return torch.nn.functional.cosine_similarity(c_update.flatten(), update.flatten(), 0).item()


@pytest.fixture
def layer():
    aligned = rand(12, 20, seed=10)
    unaligned = aligned - 0.3 * rand(12, 20, seed=11)
    lora = LowRank(A=rand(3, 20, seed=12), B=rand(12, 3, seed=13), scale=0.5)
    safety = LowRank(A=rand(2, 20, seed=14), B=rand(12, 2, seed=15), scale=2.0)
    return aligned, unaligned, lora, safety


def test_score_matches_explicit_alignment_matrix(layer):
    aligned, unaligned, lora, _ = layer
    update = lora.dense()
    method = METHODS.create("safemerge")
    dense = method.score(LAYER, {"finetuned": aligned + update, "unaligned": unaligned}, aligned)
    assert dense.rho == pytest.approx(dense_rho(aligned, unaligned, update), abs=1e-5)
    assert dense.norm_update == pytest.approx(update.norm().item(), rel=1e-5)
    c_update = alignment_matrix(aligned, unaligned) @ update
    assert dense.norm_projected == pytest.approx(c_update.norm().item(), rel=1e-4)
    factored = method.score(LAYER, {"finetuned": lora, "unaligned": unaligned}, aligned)
    assert factored.rho == pytest.approx(dense.rho, abs=1e-5)
    assert factored.norm_projected == pytest.approx(dense.norm_projected, rel=1e-4)


def test_lowrank_algebra_equals_dense(layer):
    aligned, unaligned, lora, safety = layer
    x = rand(12, 20, seed=3)
    assert inner(lora, safety) == pytest.approx((lora.dense() * safety.dense()).sum().item(), 1e-4)
    assert inner(x, lora) == pytest.approx((x * lora.dense()).sum().item(), rel=1e-4)
    assert norm(lora) == pytest.approx(lora.dense().norm().item(), rel=1e-5)
    assert cosine(lora, x) == pytest.approx(
        torch.nn.functional.cosine_similarity(lora.dense().flatten(), x.flatten(), 0).item(), 1e-4
    )
    v = aligned - unaligned
    projected = project(v, lora)
    assert isinstance(projected, LowRank) and projected.A is lora.A
    torch.testing.assert_close(projected.dense(), project(v, lora.dense()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        project(v, lora.dense()), alignment_matrix(aligned, unaligned) @ lora.dense()
    )
    tall = rand(20, 12, seed=4)  # out > in takes the other product order
    torch.testing.assert_close(project(tall, x.T), tall @ tall.T @ x.T / tall.norm())


def test_safemerge_selected_and_kept_layers(layer):
    aligned, unaligned, lora, safety = layer
    finetuned = aligned + lora.dense()
    safety_full = aligned + safety.dense()
    tensors = {"finetuned": finetuned, "unaligned": unaligned, "safety": safety_full}
    merged = run("safemerge", tensors, aligned, selected=True)
    torch.testing.assert_close(merged, 0.8 * finetuned + 0.2 * safety_full)
    kept = run("safemerge", tensors, aligned, selected=False)
    torch.testing.assert_close(kept, finetuned)
    no_safety = run(
        "safemerge", {"finetuned": finetuned, "unaligned": unaligned}, aligned, selected=True
    )
    torch.testing.assert_close(no_safety, 0.8 * finetuned + 0.2 * aligned)
    norm_name = "model.layers.0.input_layernorm.weight"
    vector = {"finetuned": finetuned[0], "unaligned": unaligned[0]}
    torch.testing.assert_close(
        run("safemerge", vector, aligned[0], name=norm_name, selected=True), finetuned[0]
    )


def test_safemerge_lora_path_equals_dense(layer):
    aligned, unaligned, lora, safety = layer
    method = METHODS.create("safemerge")
    p = params("safemerge", selected=True, weights=[0.7, 0.3], combination="exact")
    factored = {"finetuned": lora, "unaligned": unaligned, "safety": safety}
    dense = {k: aligned + v.dense() if isinstance(v, LowRank) else v for k, v in factored.items()}
    expected = method.merge(LAYER, dense, aligned, p)
    out = method.merge_lowrank(LAYER, factored, aligned, p)
    assert isinstance(out, LowRank) and out.rank == lora.rank + safety.rank
    torch.testing.assert_close(aligned + out.dense(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        method.merge(LAYER, factored, aligned, p), expected, rtol=1e-4, atol=1e-5
    )


def test_safe_lora_projects_selected_layers(layer):
    aligned, unaligned, lora, _ = layer
    finetuned = aligned + lora.dense()
    tensors = {"finetuned": finetuned, "unaligned": unaligned}
    out = run("safe_lora", tensors, aligned, selected=True)
    expected = aligned + alignment_matrix(aligned, unaligned) @ lora.dense()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run("safe_lora", tensors, aligned, selected=False), finetuned)
    method = METHODS.create("safe_lora")
    p = params("safe_lora", selected=True)
    low = method.merge_lowrank(LAYER, {"finetuned": lora, "unaligned": unaligned}, aligned, p)
    assert isinstance(low, LowRank) and low.A is lora.A and low.scale == lora.scale
    torch.testing.assert_close(aligned + low.dense(), expected, rtol=1e-4, atol=1e-5)


def layer_scores(*rhos):
    scores = [LayerScore(f"l{i}", rho, 1.0, 1.0, 1.0) for i, rho in enumerate(rhos)]
    return [*scores, LayerScore("untouched", math.nan, 1.0, 0.0, 0.0)]


def test_layer_selection_threshold_and_lowest():
    scores = layer_scores(0.9, 0.1, 0.4, 0.3, 0.5)
    assert METHODS.create("safemerge").select(scores, params("safemerge")) == {"l1", "l3"}
    threshold = params("safe_lora", select="threshold")  # IBM's rule: rho <= tau
    assert METHODS.create("safe_lora").select(scores, threshold) == {"l1", "l2", "l3", "l4"}
    lowest = params("safe_lora", select="lowest", k=2)
    assert METHODS.create("safe_lora").select(scores, lowest) == {"l1", "l3"}


def test_safe_lora_default_is_ibm_number_mode_k_10_with_ties_kept():
    method = METHODS.create("safe_lora")
    rhos = [0.05 * i for i in range(14)]
    assert method.select(layer_scores(*rhos), params("safe_lora")) == {f"l{i}" for i in range(10)}
    # three layers tie at the 3rd lowest (0.3): k=3 projects all five layers <= 0.3,
    # as IBM's `thrs = sort(cos)[:k][-1]; project if cos <= thrs`
    tied = layer_scores(0.7, 0.3, 0.1, 0.3, 0.3, 0.2)
    assert method.select(tied, params("safe_lora", k=2)) == {"l2", "l5"}
    assert method.select(tied, params("safe_lora", k=3)) == {"l1", "l2", "l3", "l4", "l5"}
    # both references round rho to 5 decimals before comparing
    near = layer_scores(0.2, 0.2000001, 0.9)
    assert method.select(near, params("safe_lora", k=1)) == {"l0", "l1"}
    assert method.select(layer_scores(0.5000001), params("safe_lora", select="threshold"))
    assert not METHODS.create("safemerge").select(layer_scores(0.3500001), params("safemerge"))
    assert method.select(layer_scores(0.4, 0.6), params("safe_lora", k=5)) == {"l0", "l1"}
    # a tau given without select means the threshold rule, as `safe_lora:tau=0.35` always did
    assert method.select(layer_scores(*rhos), params("safe_lora", tau=0.12)) == {"l0", "l1", "l2"}


def test_resta_equals_b_plus_aligned_minus_harmful_model_with_weight_1(layer):
    aligned, _, lora, _ = layer
    finetuned = aligned + lora.dense()
    harmful = aligned + rand(12, 20, seed=16)  # A fine-tuned on harmful data
    out = run("resta", {"finetuned": finetuned, "harmful_model": harmful}, aligned)
    assert params("resta").global_["beta"] == 1.0
    torch.testing.assert_close(out, finetuned + 1.0 * (aligned - harmful))
    assert METHODS.get("resta").required_roles == ("finetuned", "harmful_model")
    factored = run("resta", {"finetuned": lora, "harmful_model": harmful}, aligned)
    torch.testing.assert_close(factored, out, rtol=1e-5, atol=1e-5)


def test_resta_equals_task_arithmetic_with_weights_1_b_minus_b(layer):
    aligned, unaligned, lora, _ = layer
    finetuned = aligned + lora.dense()
    b = 0.7
    out = run("resta", {"finetuned": finetuned, "harmful_model": unaligned}, aligned, beta=b)
    torch.testing.assert_close(out, finetuned + b * (aligned - unaligned))
    weights = {"B": {"weight": 1.0}, "A": {"weight": b}, "H": {"weight": -b}}
    tensors = {"B": finetuned, "A": aligned, "H": unaligned}
    ta = run("task_arithmetic", tensors, unaligned, per_model=weights)
    torch.testing.assert_close(out, ta, rtol=1e-5, atol=1e-5)


def test_resta_dare_reproducible(layer):
    aligned, harmful, lora, _ = layer
    tensors = {"finetuned": aligned + lora.dense(), "harmful_model": harmful}
    first = run("resta", tensors, aligned, density=0.5, seed=1)
    torch.testing.assert_close(first, run("resta", tensors, aligned, density=0.5, seed=1))
    assert not torch.allclose(first, run("resta", tensors, aligned, density=0.5, seed=2))
    kept = first - aligned - (aligned - harmful)
    assert 0.35 < (kept.abs() > 1e-5).float().mean().item() < 0.65


def test_interpolate_closed_form_and_lora(layer):
    aligned, _, lora, _ = layer
    finetuned = aligned + lora.dense()
    out = run("interpolate", {"finetuned": finetuned}, aligned, alpha=0.25)
    torch.testing.assert_close(out, finetuned + 0.25 * (aligned - finetuned))
    p = params("interpolate", alpha=0.25)
    low = METHODS.create("interpolate").merge_lowrank(LAYER, {"finetuned": lora}, aligned, p)
    torch.testing.assert_close(aligned + low.dense(), out, rtol=1e-5, atol=1e-5)


def test_safemerge_peft_linear_equals_the_formula_with_cross_terms(layer):
    aligned, unaligned, lora, _ = layer
    safety = LowRank(A=rand(3, 20, seed=14), B=rand(12, 3, seed=15), scale=2.0)
    p = params("safemerge", selected=True, combination="peft-linear", weights=[0.7, -0.3])
    tensors = {"finetuned": lora, "unaligned": unaligned, "safety": safety}
    out = METHODS.create("safemerge").merge_lowrank(LAYER, tensors, aligned, p)
    a = math.sqrt(0.7 * 0.5) * lora.A - math.sqrt(0.3 * 2.0) * safety.A
    b = math.sqrt(0.7 * 0.5) * lora.B + math.sqrt(0.3 * 2.0) * safety.B
    assert out.rank == 3 and out.scale == 1.0
    torch.testing.assert_close(out.dense(), b @ a)
    exact_params = params("safemerge", selected=True, weights=[0.7, -0.3], combination="exact")
    exact = METHODS.create("safemerge").merge_lowrank(LAYER, tensors, aligned, exact_params)
    assert not torch.allclose(out.dense(), exact.dense(), atol=1e-3)  # the cross terms
    # a full-weight input has no factors: the exact sum, whatever the combination
    dense = {**tensors, "safety": aligned + safety.dense()}
    merged = METHODS.create("safemerge").merge(LAYER, dense, aligned, p)
    expected = aligned + 0.7 * lora.dense() - 0.3 * safety.dense()
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    other_rank = {**tensors, "safety": LowRank(rand(2, 20), rand(12, 2), 1.0)}
    with pytest.raises(ValueError, match="one rank"):
        METHODS.create("safemerge").merge_lowrank(LAYER, other_rank, aligned, p)


def test_safemerge_peft_linear_equals_peft_add_weighted_adapter():
    """PEFT's own ``add_weighted_adapter(combination_type="linear")`` on a tiny model."""
    from checkpoint_support import tiny_llama
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(
        tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="ft"
    )
    model.add_adapter("safe", LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    model.add_weighted_adapter(["ft", "safe"], [0.8, 0.2], "merged", combination_type="linear")
    method = METHODS.create("safemerge")
    p = params("safemerge", selected=True, combination="peft-linear")
    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "merged" not in module.lora_A:
            continue
        roles = {
            role: LowRank(module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a])
            for role, a in (("finetuned", "ft"), ("safety", "safe"))
        }
        base = module.base_layer.weight.detach()
        ours = method.merge_lowrank(f"{name}.weight", roles, base, p)
        torch.testing.assert_close(ours.dense(), module.get_delta_weight("merged"))
        checked += 1
    assert checked == 2 * 3
