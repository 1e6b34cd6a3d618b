"""The ESMM / MoE / AITM / CTnoCVR families: interface, gradients, learning, presets, layers."""
from __future__ import annotations

import math

import pytest
import torch

from cvr_spark import losses
from cvr_spark.models import registry
from cvr_spark.models.layers import CGC, PLE, TokenAttention
from tests.model_testing import make_batch, make_spec, params_without_grad, train_auc

NAMES = ["mlp", "esmm", "omoe", "mmoe", "cgc", "ple", "aitm", "esmm+ctnocvr", "mmoe+ctnocvr", "cgc+ctnocvr"]
CTNOCVR = ["esmm+ctnocvr", "mmoe+ctnocvr", "cgc+ctnocvr"]
PRODUCT_NAMES = [n for n in NAMES if n != "aitm"]
SPECS = {"plain": dict(), "multi_dense": dict(n_multi=2, n_dense=3)}


def build(name: str, spec_kind: str = "multi_dense", preset: str = "fast", **overrides):
    torch.manual_seed(0)
    spec = make_spec(**SPECS[spec_kind])
    model = registry.build(name, spec, registry.preset_options(name, preset, overrides))
    return model, spec


@pytest.mark.parametrize("spec_kind", list(SPECS))
@pytest.mark.parametrize("name", NAMES)
def test_outputs_shapes_and_ranges(name: str, spec_kind: str) -> None:
    model, spec = build(name, spec_kind)
    model.eval()
    out = model(make_batch(spec, 64, seed=1))
    assert set(type(model).outputs) <= set(out)
    assert {"p_ctr", "p_cvr", "p_ctcvr", model.cvr_output, model.ctcvr_output} <= set(out)
    for key, value in out.items():
        assert value.shape == (64,), key
        assert torch.isfinite(value).all() and (value >= 0).all() and (value <= 1).all(), key


@pytest.mark.parametrize("name", NAMES)
def test_paper_preset_builds_and_runs(name: str) -> None:
    model, spec = build(name, "multi_dense", preset="paper")
    batch = make_batch(spec, 32, seed=2)
    terms = model.loss(batch, model(batch))
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    model, spec = build(name)
    # No parameter of these models is frozen: every one must receive a gradient.
    assert params_without_grad(model, make_batch(spec, 128, seed=3)) == []


@pytest.mark.parametrize("name", PRODUCT_NAMES)
def test_ctcvr_is_ctr_times_cvr(name: str) -> None:
    model, spec = build(name)
    out = model(make_batch(spec, 32, seed=4))
    torch.testing.assert_close(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"])


def test_aitm_outputs_purchase_head_as_ctcvr() -> None:
    model, spec = build("aitm")
    assert (model.cvr_output, model.ctcvr_output) == ("p_cvr", "p_ctcvr")
    out = model(make_batch(spec, 32, seed=5))
    expected = (out["p_ctcvr"] / out["p_ctr"]).clamp(0, 1)
    torch.testing.assert_close(out["p_cvr"], expected)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_lowers_the_loss(name: str) -> None:
    model, spec = build(name, lr=1e-3)
    batch = make_batch(spec, 256, seed=6)
    model.eval()  # dropout off: compare the same deterministic loss before and after
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.loss(batch, model(batch))["total"]
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.loss(batch, model(batch))["total"]
    assert after.item() < before.item()


@pytest.mark.parametrize("name", NAMES)
def test_learns_a_small_batch_with_signal(name: str) -> None:
    model, spec = build(name)
    train, held_out = make_batch(spec, 512, seed=7), make_batch(spec, 1000, seed=8)
    held_ctr, held_ctcvr = train_auc(model, train, steps=80, eval_batch=held_out)
    train_ctr, train_ctcvr = train_auc(model, train, steps=0)  # evaluate only
    assert train_ctr > 0.8 and train_ctcvr > 0.8, (train_ctr, train_ctcvr)
    # Same labelling rule, unseen rows: the model learnt the signal, not the rows.
    assert held_ctr > 0.8 and held_ctcvr > 0.75, (held_ctr, held_ctcvr)


def test_random_labels_give_chance_held_out_auc() -> None:
    """Control for the test above: without signal, held-out AUC stays near 0.5."""
    model, spec = build("esmm")
    train, held_out = make_batch(spec, 512, seed=7, signal=False), make_batch(spec, 1000, seed=8, signal=False)
    held_ctr, held_ctcvr = train_auc(model, train, steps=80, eval_batch=held_out)
    assert abs(held_ctr - 0.5) < 0.1 and abs(held_ctcvr - 0.5) < 0.1, (held_ctr, held_ctcvr)


@pytest.mark.parametrize("name", NAMES)
def test_batch_without_clicks_gives_finite_loss(name: str) -> None:
    model, spec = build(name)
    batch = make_batch(spec, 64, seed=8)
    batch["click"] = torch.zeros_like(batch["click"])
    batch["conversion"] = torch.zeros_like(batch["conversion"])
    terms = model.loss(batch, model(batch))
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()


def test_esmm_loss_is_ctr_plus_ctcvr_over_exposures() -> None:
    model, spec = build("esmm", ctcvr_weight=2.0)
    batch = make_batch(spec, 64, seed=9)
    out = model(batch)
    terms = model.loss(batch, out)
    o, r, p_ctr, p_ctcvr = (x.detach().double() for x in (batch["click"], batch["conversion"], out["p_ctr"], out["p_ctcvr"]))
    ctr = -(o * p_ctr.log() + (1 - o) * (1 - p_ctr).log()).mean()
    ctcvr = -(o * r * p_ctcvr.log() + (1 - o * r) * (1 - p_ctcvr).log()).mean()
    assert set(terms) == {"ctr", "ctcvr", "total"}
    assert terms["total"].item() == pytest.approx((ctr + 2.0 * ctcvr).item(), rel=1e-5)


def test_mlp_cvr_tower_learns_only_from_clicks() -> None:
    model, spec = build("mlp", spec_kind="plain")
    batch = make_batch(spec, 64, seed=10)
    out = model(batch)
    unclicked = batch["click"] == 0
    grads = torch.autograd.grad(model.loss(batch, out)["cvr"], out["p_cvr"])[0]
    assert (grads[unclicked] == 0).all() and (grads[~unclicked] != 0).any()


@pytest.mark.parametrize("name", CTNOCVR)
def test_ctnocvr_loss_and_score(name: str) -> None:
    model, spec = build(name, cvr_weight=0.5, ctnocvr_weight=1.5, score_weight=0.05)
    assert (model.cvr_output, model.ctcvr_output) == ("p_score", "p_ctcvr")
    batch = make_batch(spec, 64, seed=11)
    out = model(batch)
    terms = model.loss(batch, out)
    assert set(terms) == {"ctr", "cvr", "ctnocvr", "total"}  # no CTCVR term
    o, r = batch["click"].double(), batch["conversion"].double()
    p = out["p_ctnocvr"].detach().double()
    c = o * (1 - r)
    expected = -(c * p.log() + (1 - c) * (1 - p).log()).mean()
    assert terms["ctnocvr"].item() == pytest.approx(expected.item(), rel=1e-5)
    total = terms["ctr"] + 0.5 * terms["cvr"] + 1.5 * terms["ctnocvr"]
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6)
    score = (out["p_cvr"] + 0.05 * (1 - out["p_ctnocvr"])) / 1.05
    torch.testing.assert_close(out["p_score"], score)


def test_aitm_loss_terms_and_attention_init() -> None:
    model, spec = build("aitm", preset="paper")
    att = model.attention
    for lin in (att.q, att.k, att.v):
        assert lin.weight.shape == (32, 32) and lin.bias is None
        assert 0.007 < lin.weight.std().item() < 0.013
    batch = make_batch(spec, 64, seed=12)
    out = model(batch)
    terms = model.loss(batch, out)
    calib = (out["p_ctcvr"] - out["p_ctr"]).clamp_min(0).mean()
    assert terms["calibrator"].item() == pytest.approx(calib.item(), rel=1e-5)
    l2 = sum(w.pow(2).sum().item() for w in [model.embedding.table.weight, att.q.weight, att.k.weight, att.v.weight]) / 2
    assert terms["l2"].item() == pytest.approx(l2, rel=1e-5)
    expected = terms["ctr"] + terms["ctcvr"] + 0.6 * terms["calibrator"] + 1e-6 * terms["l2"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_token_attention_matches_manual_computation() -> None:
    torch.manual_seed(0)
    att = TokenAttention(3, init_std=0.5)
    x = torch.randn(4, 2, 3)
    wq, wk, wv = att.q.weight.detach().T, att.k.weight.detach().T, att.v.weight.detach().T
    out = att(x)
    for b in range(4):
        scores = [float(x[b, t] @ wq @ (x[b, t] @ wk)) / math.sqrt(3) for t in range(2)]
        a = [math.exp(s) / sum(math.exp(z) for z in scores) for s in scores]
        manual = sum(a[t] * (x[b, t] @ wv) for t in range(2))
        torch.testing.assert_close(out[b], manual)


@pytest.mark.parametrize("mode", ["softmax", "masked"])
def test_cgc_gates_only_own_and_shared_experts(mode: str) -> None:
    torch.manual_seed(0)
    cgc = CGC(6, n_specific=[1, 0, 3], n_shared=2, expert_dims=[4], gate_mode=mode)
    x = torch.randn(5, 6)
    own = [[0, 4, 5], [4, 5], [1, 2, 3, 4, 5]]  # layout: specific 0 | specific 2 (x3) | shared (x2)
    for k in range(3):
        w = cgc.task_gate_weights(x, k)  # [B, 6]
        others = [e for e in range(6) if e not in own[k]]
        assert (w[:, others] == 0).all() and (w[:, own[k]] > 0).all()
        sums = w.sum(1)
        if mode == "softmax":
            torch.testing.assert_close(sums, torch.ones(5))
        else:
            assert (sums < 1).all()  # masked softmax over all experts, not renormalised


def test_ple_levels_and_errors() -> None:
    ple = PLE(6, n_specific=[1, 1], n_shared=2, expert_dims=[4], n_levels=3)
    assert [lvl.shared_gate is not None for lvl in ple.levels] == [True, True, False]
    outs = ple(torch.randn(5, 6))
    assert [o.shape for o in outs] == [(5, 4), (5, 4)]
    with pytest.raises(ValueError, match="every task needs an expert"):
        CGC(6, n_specific=[1, 0], n_shared=0, expert_dims=[4])
    with pytest.raises(ValueError, match="gate_mode"):
        CGC(6, n_specific=[1, 1], n_shared=1, expert_dims=[4], gate_mode="renorm")


def test_bad_options_name_the_key() -> None:
    spec = make_spec()
    with pytest.raises(ValueError, match="n_specific_experts"):
        registry.build("cgc", spec, {"n_specific_experts": [1, 1, 1]})
    with pytest.raises(ValueError, match="dropout has 3 rates but tower_dims has 2"):
        registry.build("esmm", spec, {"tower_dims": [8, 4]})
    with pytest.raises(ValueError, match="unknown option"):
        registry.build("mmoe", spec, {"n_expert": 3})


def test_paper_presets_hold_the_paper_settings() -> None:
    for name in ["mlp", "esmm", "omoe", "mmoe", "cgc", "ple", "aitm"]:
        opts = registry.preset_options(name, "paper")
        assert (opts["embedding_dim"], opts["tower_dims"], opts["dropout"]) == (5, [128, 64, 32], [0.1, 0.3, 0.3])
        assert (opts["lr"], opts["batch_size"]) == (1e-3, 2000)
        assert 1e-6 in (opts["weight_decay"], opts.get("l2_reg"))
    for name in CTNOCVR:
        opts = registry.preset_options(name, "paper")
        assert (opts["embedding_dim"], opts["tower_dims"], opts["batch_size"], opts["lr"]) == (12, [200, 80], 5000, 1e-3)
        assert (opts["cvr_weight"], opts["ctnocvr_weight"], opts["score_weight"]) == (0.5, 1.0, 0.01)
    assert registry.preset_options("mmoe+ctnocvr", "paper")["expert_dims"] == [4]
    assert registry.preset_options("cgc+ctnocvr", "paper")["n_specific_experts"] == [1, 0, 3]


def test_helper_batch_label_rates() -> None:
    spec = make_spec(n_multi=1, n_dense=1)
    batch = make_batch(spec, 2000, seed=13)
    click, conv = batch["click"], batch["conversion"]
    assert 0.25 < click.mean().item() < 0.35
    assert 0.25 < conv[click == 1].mean().item() < 0.35
    assert (conv <= click).all()
    assert torch.equal(losses.ctnocvr_label(click, conv), click * (1 - conv))


def test_fast_dropout_rate_scale_gradient_and_seed():
    from cvr_spark.models.base import FastDropout

    drop = FastDropout(0.3)
    assert drop.threshold == 77 and drop.scale == pytest.approx(256 / 179)
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    # drop rate 77/256 within 5 binomial standard errors; kept values scaled to stay unbiased
    p = 77 / 256
    assert abs((~kept).float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.allclose(y[kept], torch.full_like(y[kept], 256 / 179))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * (256 / 179))  # d y / d x = mask * scale
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # seeded like every CPU draw
    drop.eval()
    assert drop(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout rate"):
        FastDropout(1.0)


def test_fast_dropout_keeps_bytes_at_or_above_the_threshold() -> None:
    from cvr_spark.models.base import FastDropout

    drop = FastDropout(0.3)
    x = torch.randn(1000, 37)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)  # the same draw: one random byte per element
    words = torch.randint(-(2 ** 63), 2 ** 63 - 1, ((x.numel() + 7) // 8,), dtype=torch.int64)
    keep = words.view(torch.uint8)[: x.numel()].view(x.shape) >= drop.threshold
    assert drop.threshold == 77
    torch.testing.assert_close(y, torch.where(keep, x * drop.scale, torch.zeros_like(x)), rtol=0, atol=0)
    assert abs(float((y == 0).float().mean()) - 77 / 256) < 0.01
    drop.eval()
    assert torch.equal(drop(x), x)


def test_mlp_relu_dropout_node_matches_the_modules() -> None:
    """CPU training runs ReLU -> FastDropout as one autograd node: same output, same gradients
    and the same random draw as the modules one after the other."""
    from cvr_spark.models.base import MLP

    torch.manual_seed(0)
    mlp = MLP(7, [16, 8], [0.3, 0.5], out_dim=1)
    assert mlp._fused == {1, 4}
    x = torch.randn(50, 7, requires_grad=True)
    grads = []
    for fused in (True, False):
        torch.manual_seed(11)
        y = mlp(x) if fused else mlp.net(x)
        grads.append((y, *torch.autograd.grad(y.pow(2).sum(), [x, *mlp.parameters()])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(grads[0][1].abs().sum()) > 0
