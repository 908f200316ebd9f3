"""CSULoRA against its closed form: the objective's minimiser, the components it keeps and
attenuates, the LoRA path against the dense one, and the command on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from merge_support import _lora, build_tiny_models, read_weights

from safealign.checkpoint import ADAPTER_CONFIG_NAME, Checkpoint
from safealign.merge.cli import merge_command
from safealign.merge.methods import METHODS, LowRank, MergeParams
from safealign.merge.methods.csulora import attenuation, closest_safe_update, safety_subspace

LAYER = "model.layers.0.self_attn.q_proj.weight"
OUT, IN, R = 12, 20, 3


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def params(selected: bool = True, **overrides) -> MergeParams:
    values = {p.name: p.default for p in METHODS.get("csulora").parameters}
    return MergeParams({**values, **overrides}, {}, selected=selected)


@pytest.fixture
def layer():
    """An aligned weight, the model before alignment (V of rank 4) and a LoRA on it."""
    aligned = rand(OUT, IN, seed=1)
    v = rand(OUT, 4, seed=2) @ rand(4, IN, seed=3)
    lora = LowRank(A=rand(R, IN, seed=4), B=rand(OUT, R, seed=5), scale=0.5)
    return aligned, aligned - v, v, lora


def projectors(v: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """P = U_k U_kᵀ and Q = R_k R_kᵀ as explicit matrices (k: the fewest holding ``energy``)."""
    u, s, vh = torch.linalg.svd(v)
    share = (s**2).cumsum(0) / (s**2).sum()
    k = int((share < energy - 1e-12).sum()) + 1
    return u[:, :k] @ u[:, :k].T, vh[:k].T @ vh[:k], k


def objective(b: torch.Tensor, target: torch.Tensor, outside: torch.Tensor, weight: float):
    """‖X − target‖² + weight·‖outside X‖² (or X·outside when ``outside`` is [in, in])."""
    penalised = outside @ b if outside.shape[0] == b.shape[0] else b @ outside
    return (b - target).square().sum() + weight * penalised.square().sum()


def test_closed_form_minimises_the_penalised_objective_on_each_factor(layer):
    _, _, v, lora = layer
    lam, energy = 1.7, 0.9
    p, q, k = projectors(v, energy)
    dense = lora.dense()
    eps_out = ((torch.eye(OUT) - p) @ dense).square().sum() / dense.square().sum()
    eps_in = (dense @ (torch.eye(IN) - q)).square().sum() / dense.square().sum()
    out = closest_safe_update(lora, v, penalty=lam, energy=energy)
    assert safety_subspace(v, energy).rank == k < 4
    p_off, q_off = torch.eye(OUT, dtype=v.dtype) - p, torch.eye(IN, dtype=v.dtype) - q
    # the normal equations of each factor's objective, solved numerically
    b_star = torch.linalg.solve(torch.eye(OUT, dtype=v.dtype) + lam * eps_out * p_off, lora.B)
    a_star = torch.linalg.solve(torch.eye(IN, dtype=v.dtype) + lam * eps_in * q_off, lora.A.T).T
    torch.testing.assert_close(out.B, b_star)
    torch.testing.assert_close(out.A, a_star)
    for step in (rand(OUT, R, seed=20), rand(OUT, R, seed=21)):
        best = objective(out.B, lora.B, p_off, lam * eps_out)
        assert best < objective(out.B + 1e-3 * step, lora.B, p_off, lam * eps_out)
    best = objective(out.A, lora.A, q_off, lam * eps_in)
    assert best < objective(out.A + 1e-3 * rand(R, IN, seed=22), lora.A, q_off, lam * eps_in)
    # the four blocks: fully aligned kept, partially aligned by α or β, off-subspace by αβ
    alpha, beta = 1 / (1 + lam * eps_in), 1 / (1 + lam * eps_out)
    expected = (
        p @ dense @ q
        + alpha * p @ dense @ q_off
        + beta * p_off @ dense @ q
        + alpha * beta * p_off @ dense @ q_off
    )
    torch.testing.assert_close(out.dense(), expected)
    factors = attenuation(lora, safety_subspace(v, energy), lam)
    assert (factors.alpha, factors.beta) == pytest.approx((alpha.item(), beta.item()))


def test_an_update_inside_the_subspace_is_kept(layer):
    _, _, v, _ = layer
    p, q, _ = projectors(v, 0.9)
    inside = p @ rand(OUT, IN, seed=6) @ q
    torch.testing.assert_close(closest_safe_update(inside, v, penalty=5.0, energy=0.9), inside)


def test_an_update_outside_the_subspace_is_attenuated_not_deleted(layer):
    _, _, v, _ = layer
    p, q, _ = projectors(v, 0.9)
    eye_out, eye_in = torch.eye(OUT, dtype=v.dtype), torch.eye(IN, dtype=v.dtype)
    outside = (eye_out - p) @ rand(OUT, IN, seed=7) @ (eye_in - q)
    out = closest_safe_update(outside, v, penalty=1.0, energy=0.9)
    torch.testing.assert_close(out, outside / 4)  # ε_out = ε_in = 1: αβ = 1/(1 + λ)²
    # no penalty, or no displacement to take a subspace from: nothing changes
    torch.testing.assert_close(closest_safe_update(outside, v, penalty=0.0, energy=0.9), outside)
    zero = torch.zeros_like(v)
    assert closest_safe_update(outside, zero, penalty=1.0, energy=0.9) is outside


def test_lora_path_equals_dense_path_and_keeps_the_rank(layer):
    aligned, unaligned, _, lora = layer
    method = METHODS.create("csulora")
    factored = {"finetuned": lora, "unaligned": unaligned}
    dense = {"finetuned": aligned + lora.dense(), "unaligned": unaligned}
    expected = method.merge(LAYER, dense, aligned, params())
    out = method.merge_lowrank(LAYER, factored, aligned, params())
    assert isinstance(out, LowRank) and out.rank == lora.rank and out.scale == lora.scale
    assert out.A.shape == lora.A.shape and out.B.shape == lora.B.shape
    torch.testing.assert_close(aligned + out.dense(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(method.merge(LAYER, factored, aligned, params()), expected)
    # a layer not selected (or not a layer weight) keeps the fine-tune
    kept = method.merge(LAYER, dense, aligned, params(selected=False))
    torch.testing.assert_close(kept, dense["finetuned"])


def test_every_changed_layer_with_a_displacement_is_selected(layer):
    aligned, unaligned, _, lora = layer
    method = METHODS.create("csulora")
    scored = method.score(LAYER, {"finetuned": lora, "unaligned": unaligned}, aligned)
    still = method.score("l1", {"finetuned": lora, "unaligned": aligned}, aligned)
    untouched = method.score("l2", {"finetuned": aligned, "unaligned": unaligned}, aligned)
    assert method.select([scored, still, untouched], params()) == {LAYER}


# --- the command, on tiny checkpoints ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def merge(tiny, finetuned, *extra, method="csulora"):
    args = ["--method", method, "--aligned", tiny.aligned, "--unaligned", tiny.unaligned]
    args += ["--finetuned", finetuned, "--quiet", *extra]
    return CliRunner().invoke(merge_command, [str(a) for a in args])


def test_a_lora_fine_tune_gives_an_adapter_of_the_same_rank(tiny, tmp_path):
    out = tmp_path / "o"
    result = merge(tiny, tiny.lora, "--out", out, method="csulora:penalty=2.0")
    assert result.exit_code == 0, result.output
    assert (out / ADAPTER_CONFIG_NAME).exists()
    merged = Checkpoint.open(out, base=tiny.aligned)
    lora = Checkpoint.open(tiny.lora)
    a, u = read_weights(tiny.aligned), read_weights(tiny.unaligned)
    assert merged.lora_targets() == lora.lora_targets()
    for name in lora.lora_targets():
        original, corrected = lora.lora_factors(name), merged.lora_factors(name)
        assert corrected.A.shape == original.A.shape
        expected = closest_safe_update(original, a[name] - u[name], penalty=2.0, energy=0.9)
        torch.testing.assert_close(corrected.dense(), expected.dense(), rtol=0, atol=1e-5)
        assert not torch.allclose(corrected.dense(), original.dense(), atol=1e-3)


def test_a_full_fine_tune_gives_a_model(tiny, tmp_path):
    out = tmp_path / "o"
    result = merge(tiny, tiny.finetuned, "--out", out)
    assert result.exit_code == 0, result.output
    a, u, b = (read_weights(p) for p in (tiny.aligned, tiny.unaligned, tiny.finetuned))
    merged = read_weights(out)
    assert set(merged) == set(b)
    for name in merged:
        if name.startswith("model.layers.") and merged[name].dim() == 2:
            update = closest_safe_update(
                b[name] - a[name], a[name] - u[name], penalty=1.0, energy=0.9
            )
            torch.testing.assert_close(merged[name], a[name] + update, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(merged[name], b[name])


def test_dry_run_prints_the_layer_table_and_writes_nothing(tiny, tmp_path):
    result = merge(tiny, tiny.lora, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "| name" in result.output and "9/9 layers selected" in result.output
    bad = merge(tiny, tiny.lora, "--dry-run", method="csulora:energy=1.5")
    assert bad.exit_code == 2 and "energy" in bad.output


def test_an_adapter_of_another_base_is_refused_before_work(tiny, tmp_path):
    on_unaligned = _lora(tiny.unaligned, tmp_path / "on_u", 7, ["q_proj"], 4)
    out = tmp_path / "never"
    result = merge(tiny, on_unaligned, "--out", out)
    assert result.exit_code == 2
    assert "is a LoRA on" in result.output and "not on the aligned model" in result.output
    assert not out.exists()


def test_a_yaml_config_gives_what_the_shortcut_gives(tiny, tmp_path):
    config = {
        "merge_method": "csulora",
        "base_model": str(tiny.aligned),
        "models": [
            {"model": str(tiny.lora), "parameters": {"role": "finetuned"}},
            {"model": str(tiny.unaligned), "parameters": {"role": "unaligned"}},
        ],
        "parameters": {"penalty": 3.0, "energy": 0.5},
    }
    path = tmp_path / "csulora.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(merge_command, [str(path), str(tmp_path / "y"), "--quiet"])
    assert result.exit_code == 0, result.output
    shortcut = merge(
        tiny, tiny.lora, "--out", tmp_path / "s", method="csulora:penalty=3,energy=0.5"
    )
    assert shortcut.exit_code == 0, shortcut.output
    from_yaml = Checkpoint.open(tmp_path / "y", base=tiny.aligned)
    from_flags = Checkpoint.open(tmp_path / "s", base=tiny.aligned)
    for name in from_yaml.lora_targets():
        torch.testing.assert_close(from_yaml.lora_factors(name).B, from_flags.lora_factors(name).B)
