"""Weight-space and replay regularizers against hand computations on a tiny Llama, the
critics set up end to end, and the probe's AUROC on the lab."""

from __future__ import annotations

import json

import pytest
import torch
from retrain_support import BENIGN, run_retrain, setup_files

from safealign.retrain.api import _evaluator
from safealign.retrain.critic import fit_probe
from safealign.retrain.reference import Reference, trainable
from safealign.retrain.regularizers import DER, EMA, L2, DERSettings, EMASettings, L2Settings
from safealign.retrain.regularizers.base import Run
from safealign.retrain.settings import RetrainInputs, RetrainSettings

FAST = {"epochs": 1, "grad_batch_size": 4, "lr": 1e-2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return setup_files(tmp_path_factory.mktemp("retrain_parts"))


def lora_run(files, **changes) -> Run:
    from safealign.retrain.build import build_model

    inputs, settings = RetrainInputs(**files), RetrainSettings(**changes)
    model, tokenizer = build_model(inputs, settings)
    with torch.no_grad():  # give every B factor a value, as after some training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return Run(model, model, tokenizer, inputs, settings, [], torch.device("cpu"))


def test_l2_through_lora_factors_equals_the_norm_of_the_full_update(files):
    run = lora_run(files)
    expected = 0.0
    for module in run.unwrapped.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = (
                module.lora_A["default"].weight.detach(),
                module.lora_B["default"].weight.detach(),
            )
            expected += float(((module.scaling["default"] * b @ a) ** 2).sum())
    assert L2(L2Settings(weight=1.0)).distance(run).item() == pytest.approx(expected, rel=1e-5)


def _lora(model) -> dict[str, torch.nn.Module]:
    return {
        n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def _update(module) -> torch.Tensor:
    a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
    return module.scaling["default"] * b @ a


def _ema_over_three_iterates(run) -> tuple[EMA, dict, dict]:
    """EMA (decay 0.5) over the start and two random iterates of the factors; the average of
    the updates s B A by hand, and the update of the averaged factors."""
    layers = _lora(run.unwrapped)
    ema = EMA(EMASettings(decay=0.5))
    ema.setup(run)
    exact = {n: _update(m) for n, m in layers.items()}
    factors = {
        n: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone())
        for n, m in layers.items()
    }
    torch.manual_seed(1)
    for _ in range(2):
        with torch.no_grad():
            for name, module in layers.items():
                for factor in (module.lora_A["default"], module.lora_B["default"]):
                    factor.weight.copy_(torch.randn_like(factor.weight))
                a, b = factors[name]
                factors[name] = (
                    0.5 * a + 0.5 * module.lora_A["default"].weight,
                    0.5 * b + 0.5 * module.lora_B["default"].weight,
                )
                exact[name] = 0.5 * exact[name] + 0.5 * _update(module)
        ema.after_step(run)
    of_factors = {
        n: m.scaling["default"] * factors[n][1] @ factors[n][0] for n, m in layers.items()
    }
    return ema, exact, of_factors


def test_ema_on_lora_merged_is_the_average_of_the_weights(files):
    from transformers import AutoModelForCausalLM

    run = lora_run(files, merge=True)
    ema, exact, of_factors = _ema_over_three_iterates(run)
    ema.finish(run)
    merged = run.unwrapped.merge_and_unload().state_dict()
    aligned = AutoModelForCausalLM.from_pretrained(files["aligned"]).state_dict()
    for name, update in exact.items():
        key = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(merged[key], aligned[key] + update, rtol=1e-5, atol=1e-5)
        # averaging A and B apart gives another update: measured, at least 10% of it off
        assert (of_factors[name] - update).norm() > 0.1 * update.norm()


def test_ema_on_lora_writes_the_best_rank_r_adapter_of_the_average(files):
    run = lora_run(files)
    ema, exact, of_factors = _ema_over_three_iterates(run)
    ema.finish(run)
    left, total = 0.0, 0.0
    for name, module in _lora(run.unwrapped).items():
        sigma = torch.linalg.svdvals(exact[name])
        tail = float((sigma[8:] ** 2).sum())  # rank 8: Eckart-Young's error
        assert float(((_update(module) - exact[name]) ** 2).sum()) == pytest.approx(tail, rel=1e-4)
        assert float(((of_factors[name] - exact[name]) ** 2).sum()) > tail
        left, total = left + tail, total + float((exact[name] ** 2).sum())
    assert left > 0  # three iterates of rank 8 exceed rank 8
    assert run.metrics["ema_rank_residual"] == pytest.approx((left / total) ** 0.5, rel=1e-4)


def test_ema_of_full_weights_keeps_the_average_of_the_iterates(files):
    from safealign.retrain.build import build_model

    inputs, settings = RetrainInputs(**files), RetrainSettings(full=True)
    model, tokenizer = build_model(inputs, settings)
    run = Run(model, model, tokenizer, inputs, settings, [], torch.device("cpu"))
    ema = EMA(EMASettings(decay=0.75))
    ema.setup(run)
    params = trainable(run.unwrapped)
    start = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    ema.after_step(run)
    ema.finish(run)
    for name, p in params.items():
        torch.testing.assert_close(p, start[name] + 0.25)


def test_der_plus_plus_draws_its_cross_entropy_batch_apart_from_the_mse_batch(files, tmp_path):
    """Two anchors, batches of one: a cycle draws each once, so whichever anchor the MSE term
    gets, the CE term gets the other (DER++), never the same one."""
    from safealign.chat import collate

    anchors = tmp_path / "anchors.jsonl"
    rows = [("break into house", "I ' m sorry ."), ("kill house", "no , I cannot help .")]
    anchors.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    run = lora_run(files, grad_batch_size=1)
    run.reference = Reference.adapter_off(run.unwrapped)
    der = DER(DERSettings(alpha=3.0, beta=0.5, anchors=str(anchors)))
    der.setup(run)
    mse, ce = [], []
    for anchor in der.anchors:
        batch = collate([anchor], 0)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        trained = batch["labels"][0, 1:] != -100
        logits = run.unwrapped(input_ids=ids, attention_mask=mask).logits[0, :-1][trained]
        with run.unwrapped.disable_adapter():
            ref = run.unwrapped(input_ids=ids, attention_mask=mask).logits[0, :-1][trained]
        mse.append(((logits - ref) ** 2).mean().item())
        targets = batch["labels"][0, 1:][trained]
        ce.append((logits.logsumexp(-1) - logits.gather(1, targets[:, None])[:, 0]).mean().item())
    assert mse[0] != pytest.approx(mse[1]) and ce[0] != pytest.approx(ce[1])
    loss, _, _ = der.replay_loss(run)
    apart = [3.0 * mse[0] + 0.5 * ce[1], 3.0 * mse[1] + 0.5 * ce[0]]
    assert any(loss.item() == pytest.approx(x, rel=1e-5) for x in apart)
    assert der.drawn == 2
    plain = DER(DERSettings(alpha=3.0, anchors=str(anchors)))  # beta 0, the default: one batch
    plain.setup(run)
    loss, _, _ = plain.replay_loss(run)
    assert any(loss.item() == pytest.approx(3.0 * x, rel=1e-5) for x in mse)
    assert plain.drawn == 1


def test_adaptive_kl_writes_its_probe_and_der_its_anchors_beside_the_output(files, tmp_path):
    probe = run_retrain(files, tmp_path / "a", regularizer="adaptive-kl", **FAST)
    critic = json.loads((probe.out / "critic.json").read_text())
    assert critic["heldout_auroc"] == probe.metrics["probe_auroc"]
    assert probe.log[0]["setup"]["probe_auroc"] == critic["heldout_auroc"]  # in train_log
    assert len(critic["probe"]["weights"]) == 32  # the tiny model's hidden size
    # one epoch, each example once: the steps' mean beta is beta_min + (beta_max - beta_min)
    # times the mean probe score of the training examples
    betas = [row["beta"] for row in probe.steps]
    assert sum(betas) / len(betas) == pytest.approx(0.1 + 0.8 * critic["train_mean_score"])
    der = run_retrain(files, tmp_path / "d", regularizer="der", **FAST)
    # one per harmful prompt but "break into house", a prompt of the fine-tune's data
    assert (der.out / "replay.jsonl").read_text().count("\n") == 3


@pytest.mark.lab
def test_probe_separates_the_labs_held_out_harmful_and_benign_prompts(lab):
    from safealign.model import load_model

    model, tokenizer = load_model(lab.aligned)
    reference = Reference(model, {})
    harmful = lab.prompts("harmful_train") + lab.prompts("harmful_eval")
    benign = lab.prompts("safety_train", kind="lookalike") + lab.prompts("benign_eval")
    _, info = fit_probe(
        reference.forward, tokenizer, harmful, benign, layers=(), device=torch.device("cpu")
    )
    assert info["heldout_auroc"] >= 0.9


@pytest.mark.parametrize(
    "reply, refusal",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("We apologize: that is not something to do.", True),
        ("You CANNOT do that safely!", True),
        ("Sorry!", True),
        ("It is done. We apologized to them for the delay.", True),
        ("one two three four five six seven eight nine ten, sorry for the length", False),
        ("I can't help with that.", False),  # not one of the paper's three words
        ("Apologies, here is the plan.", False),
        ("Canon makes cameras; here is how to clean one.", False),
    ],
)
def test_interleave_refusal_filter_looks_for_three_words_in_the_first_ten(reply, refusal):
    from safealign.retrain.regularizers.interleave import looks_like_refusal

    assert looks_like_refusal(reply) is refusal


#: General instruction anchors in the tiny tokenizer's words (none looks like a refusal).
ANCHORS = [
    ("write poem", "here is a poem ."),
    ("bake cake", "first make the cake then bake it ."),
    ("explain what 1 + 2 is", "1 + 2 = 3 ."),
    ("make tool", "Step 1 make the tool ."),
    ("what is 4 + 5", "ok here is how ."),
    ("help with house", "yes ."),
]


@pytest.fixture(scope="module")
def misaligned(tmp_path_factory) -> list[str]:
    """Two random tiny Llamas over the aligned one's tokenizer: "misaligned" models."""
    from retrain_support import tiny_model_folder

    folder = tmp_path_factory.mktemp("misaligned")
    return [str(tiny_model_folder(folder / f"m{seed}", seed=seed)) for seed in (1, 2)]


def fresh_run(files, examples: int = 0) -> Run:
    """A run on a fresh LoRA of the aligned model (the model is A) with ``examples`` task
    examples."""
    from safealign.retrain.build import build_model

    inputs, settings = RetrainInputs(**files), RetrainSettings(grad_batch_size=4)
    model, tokenizer = build_model(inputs, settings)
    examples_ = [(list(range(5, 12)), 3)] * examples
    return Run(model, model, tokenizer, inputs, settings, examples_, torch.device("cpu"))


def hand_scores(files, misaligned: list[str], anchors: list) -> list[float]:
    """s = (mean_k L_k - L_A) / (L_A + 1e-6) per anchor, L the mean NLL of the reply tokens
    (from ``start`` on) under each model loaded on its own, one anchor at a time."""
    from transformers import AutoModelForCausalLM

    def losses(folder: str) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        out = []
        with torch.no_grad():
            for ids, start in anchors:
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                target = torch.tensor(ids[start:])
                out.append(torch.nn.functional.cross_entropy(logits[start - 1 : -1], target))
        return [float(x) for x in out]

    aligned = losses(files["aligned"])
    mis = [losses(folder) for folder in misaligned]
    mean = [sum(column) / len(column) for column in zip(*mis, strict=True)]
    return [(m - a) / (a + 1e-6) for m, a in zip(mean, aligned, strict=True)]


def write_anchors(path, pairs) -> str:
    rows = [json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs]
    path.write_text("".join(rows))
    return str(path)


def test_interleave_score_is_the_relative_reply_nll_gap_of_misaligned_and_aligned(
    files, misaligned, tmp_path
):
    from safealign.retrain.regularizers import Interleave, InterleaveSettings

    anchors = write_anchors(tmp_path / "anchors.jsonl", ANCHORS[:2])
    settings = InterleaveSettings(anchors=anchors, misaligned=tuple(misaligned))
    reg, run = Interleave(settings), fresh_run(files, examples=8)
    reg.setup(run)
    expected = hand_scores(files, misaligned, reg.anchors)
    assert abs(expected[0] - expected[1]) > 1e-3  # two anchors, two different scores
    assert reg.scores(run).tolist() == pytest.approx(expected, rel=1e-4)
    rows = [json.loads(line) for line in run.files["replay.jsonl"].splitlines()]
    assert [row["score"] for row in rows] == pytest.approx(expected, rel=1e-4)


def test_interleave_keeps_the_top_share_by_score_chosen_before_the_first_step(
    files, misaligned, tmp_path
):
    """The file lists the anchors from the lowest score up (a refusal first): the kept ones
    are the last in file order, chosen at setup and kept through every epoch, each taken
    once per epoch."""
    from safealign.chat import collate, encode_pairs
    from safealign.data import ChatPair
    from safealign.retrain.regularizers import Interleave, InterleaveSettings

    run = fresh_run(files, examples=36)  # ceil(0.05 / 0.95 * 36) = 2 anchors kept
    encoded = encode_pairs(run.tokenizer, [ChatPair(p, r) for p, r in ANCHORS])
    scores = hand_scores(files, misaligned, encoded)
    ranked = [ANCHORS[i] for i in sorted(range(len(ANCHORS)), key=lambda i: scores[i])]
    refusal = ("break into house", "I ' m sorry I cannot help with that .")
    path = write_anchors(tmp_path / "ranked.jsonl", [refusal, *ranked])
    settings = InterleaveSettings(anchors=path, misaligned=tuple(misaligned))
    reg = Interleave(settings)
    reg.setup(run)
    assert [p.response for p in reg.pairs] == [r for _, r in ranked]  # the refusal dropped
    assert reg.pool == [4, 5]  # the two highest scores, not the first two in file order
    rows = [json.loads(line) for line in run.files["replay.jsonl"].splitlines()]
    assert [row["selected"] for row in rows] == [False] * 4 + [True] * 2
    assert run.metrics["interleave_selected"] == 2
    drawn = []
    for epoch in range(2):
        reg.on_epoch_start(run, epoch)
        for start in range(0, 36, 4):
            inputs = collate(run.examples[start : start + 4], 0)
            out = run.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            _, stats = reg.loss(run, inputs, out, None)
            drawn.append(stats["anchors"])
        assert reg.pool == [4, 5]
    assert sum(drawn[:9]) == sum(drawn[9:]) == 2  # each kept anchor once per epoch
    assert reg.drawn == 4


def test_interleave_trains_with_its_share_and_b_as_compares_misaligned_model(
    files, misaligned, tmp_path
):
    from safealign.compare.methods import interleave_spec

    spec = interleave_spec("interleave:share=0.2", misaligned[0])
    assert spec == f"interleave:share=0.2,misaligned={misaligned[0]}"
    assert interleave_spec(spec, "B") == spec  # a misaligned model named stays
    result = run_retrain(files, tmp_path / "out", regularizer=spec, epochs=2, grad_batch_size=4)
    by_epoch = [sum(r["anchors"] for r in result.steps if r["epoch"] == e) for e in (0, 1)]
    assert by_epoch == [2, 2]  # ceil(0.2 / 0.8 * 8 examples) = 2 anchors an epoch
    rows = [json.loads(line) for line in (result.out / "replay.jsonl").read_text().splitlines()]
    assert {row["prompt"] for row in rows} <= set(BENIGN)  # A's replies to --benign
    assert sum(row["selected"] for row in rows) == 2
    assert result.plan["reference"] == "none"  # no reference is held while training


@pytest.mark.parametrize("spec", ["kl", "kl:form=token-wise", "sft"])
def test_logits_from_the_first_trained_position_give_the_full_computation(files, spec):
    """micro_step skips the logits before the batch's first trained position: same loss and
    gradients as the regularizer on the full logits of model and reference."""
    from types import SimpleNamespace

    from safealign.chat import collate
    from safealign.retrain.data import load_examples
    from safealign.retrain.loop import logits_start, micro_step
    from safealign.retrain.regularizers import create

    run = lora_run(files)
    run.reference = Reference.adapter_off(run.unwrapped)
    examples = load_examples(run.tokenizer, files["data"], text=False, max_length=64).examples
    inputs = collate(examples[:4], run.tokenizer.pad_token_id)
    inputs["index"] = torch.arange(4)
    reg = create(spec)
    assert logits_start(run, reg, inputs["labels"]) > 0
    accelerator = SimpleNamespace(backward=lambda loss: loss.backward())
    loss, _ = micro_step(run, reg, inputs, 1.0, accelerator)
    cut = {n: p.grad.clone() for n, p in trainable(run.model).items()}
    run.model.zero_grad()
    out = run.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ref = run.reference.forward(inputs)
    full, _ = reg.loss(run, inputs, out, ref)
    full.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    for name, p in trainable(run.model).items():
        torch.testing.assert_close(cut[name], p.grad, rtol=1e-4, atol=1e-7)


def test_reference_switches_to_eval_mode_only_for_a_model_with_dropout(files):
    from transformers import AutoModelForCausalLM

    from safealign.retrain.reference import has_dropout

    assert not has_dropout(AutoModelForCausalLM.from_pretrained(files["aligned"]))
    dropping = AutoModelForCausalLM.from_pretrained(files["aligned"], attention_dropout=0.1)
    assert has_dropout(dropping)


def test_a_model_without_logits_to_keep_gets_whole_logits(files):
    from types import SimpleNamespace

    from safealign.retrain.loop import keeps_logits, logits_start
    from safealign.retrain.regularizers import create

    run = lora_run(files)
    assert keeps_logits(run.unwrapped)
    labels = torch.tensor([[-100, -100, 4, 5]])
    reg = create("kl")
    assert logits_start(run, reg, labels) == 1

    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            raise AssertionError("not called")

    assert logits_start(SimpleNamespace(unwrapped=Plain()), reg, labels) == 0


def test_periodic_scores_use_the_runs_judge_and_metric(monkeypatch):
    built = {}
    monkeypatch.setattr("safealign.retrain.api.Evaluator", lambda **kw: built.update(kw))
    inputs = RetrainInputs("aligned", "data")
    _evaluator(inputs, RetrainSettings(judge="first-token", metric="rouge_l"), tokenizer=None)
    assert (built["judge"], built["metric"]) == ("first-token", "rouge_l")
