"""The debiasing family (escm2_ipw, escm2_dr, dcmt, ukd, ddpo, nise, chorus): outputs, gradients,
training steps, a short overfit, presets and option validation."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cvr_spark import losses as L
from cvr_spark.models.registry import build, get, preset_options
from tests.model_testing import make_batch, make_spec, params_without_grad, train_auc

NAMES = ["escm2_ipw", "escm2_dr", "dcmt", "ukd", "ddpo", "nise", "chorus"]
SMALL = {"embedding_dim": 4, "tower_dims": [16, 8], "dropout": [0.0, 0.0]}
EXTRA = {"ddpo": {"bottom_dims": [16], "bottom_dropout": 0.0}, "ukd": {"discriminator_dims": [8]}}
# (name, options) pairs: every model at small settings plus the switches that change the graph.
VARIANTS = [(n, {}) for n in NAMES] + [
    ("escm2_ipw", {"backbone": "mmoe", "n_experts": 2, "expert_dims": [8], "ipw_normalization": "click"}),
    ("escm2_ipw", {"bottom_dims": [12], "weight_cap": 15.0}),
    ("escm2_dr", {"imputation_activation": "softplus", "dr_detach_error": True}),
    ("dcmt", {"wide": False}),
    ("ukd", {"teacher_detach_embedding": False, "detach_uncertainty": True}),
    ("ddpo", {"reduction": "sum", "batch_norm": False}),
    ("nise", {"dynamic_weight": False, "entropy_weight": 0.0}),
    ("chorus", {"use_ndm": False}),
    ("chorus", {"use_sam": False}),
    ("chorus", {"include_ctr_loss": False, "cvr_loss": "plain"}),
    ("chorus", {"self_normalize": True, "weight_cap": 20.0, "bottom_dims": [12]}),
]
IDS = [f"{n}-{'-'.join(sorted(o)) or 'default'}" for n, o in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is much faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(name: str, seed: int = 0, **options):  # noqa: ANN201 - any CVRModel
    torch.manual_seed(seed)
    return build(name, make_spec(), {**SMALL, **EXTRA.get(name, {}), **options})


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return make_batch(make_spec(), 128, seed=1)


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_outputs_shapes_ranges_and_product(name: str, options: dict, batch: dict) -> None:
    model = make_model(name, **options).eval()
    with torch.no_grad():
        out = model(batch)
    assert set(model.outputs) == set(out)
    assert {"p_ctr", "p_cvr", "p_ctcvr", model.cvr_output, model.ctcvr_output} <= set(out)
    for key, v in out.items():
        assert v.shape == (128,), key
        assert bool(torch.isfinite(v).all()), key
        upper = float("inf") if key == "err_hat" else 1.0
        assert bool(((v >= 0) & (v <= upper)).all()), key
    torch.testing.assert_close(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"])


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_gradients_reach_every_parameter(name: str, options: dict, batch: dict) -> None:
    model = make_model(name, **options)
    assert params_without_grad(model, batch) == []


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_loss_terms_are_finite_scalars(name: str, options: dict, batch: dict) -> None:
    model = make_model(name, **options)
    terms = model.loss(batch, model(batch))
    assert "total" in terms and len(terms) > 2
    for key, v in terms.items():
        assert v.dim() == 0 and bool(torch.isfinite(v)), key


@pytest.mark.parametrize("name", NAMES)
def test_one_step_lowers_the_loss(name: str, batch: dict) -> None:
    model = make_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    before = model.loss(batch, model(batch))["total"]
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.loss(batch, model(batch))["total"]
    assert float(after) < float(before.detach())


@pytest.mark.parametrize("name", NAMES)
def test_short_overfit_learns_click_and_conversion(name: str) -> None:
    spec = make_spec()
    batch = make_batch(spec, 256, seed=3)
    model = make_model(name, seed=1)
    ctr_auc, ctcvr_auc = train_auc(model, batch, steps=60, lr=0.01)
    with torch.no_grad():
        p_cvr = model(batch)[model.cvr_output].numpy()
    clicked = batch["click"].numpy() == 1
    cvr_auc = roc_auc_score(batch["conversion"].numpy()[clicked], p_cvr[clicked])
    assert ctr_auc > 0.75 and ctcvr_auc > 0.75 and cvr_auc > 0.65, (ctr_auc, ctcvr_auc, cvr_auc)


@pytest.mark.parametrize("clicks", [0.0, 1.0], ids=["no_click", "all_click"])
@pytest.mark.parametrize("name", NAMES)
def test_empty_click_or_unclick_space_trains(name: str, clicks: float, batch: dict) -> None:
    b = dict(batch)
    b["click"] = torch.full_like(batch["click"], clicks)
    b["conversion"] = batch["conversion"] * b["click"]
    model = make_model(name)
    total = model.loss(b, model(b))["total"]
    total.backward()
    assert bool(torch.isfinite(total))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_chorus_aligned_soft_labels_are_detached(batch: dict) -> None:
    model = make_model("chorus")
    out = model(batch)
    align = model.loss(batch, out)["align"]
    g_uncvr, g_cvr = torch.autograd.grad(align, [out["p_uncvr"], out["p_cvr"]])
    p_cvr, p_uncvr, p_ctr = (out[k].detach().double().numpy() for k in ("p_cvr", "p_uncvr", "p_ctr"))
    click = batch["click"].numpy()
    # With detached labels, d align / d p_uncvr involves only the two BCE(p_uncvr, 1 - sg(p_cvr)) terms.
    o, n = click == 1, click == 0
    w = np.where(o, 1 / np.clip(p_ctr, 0.01, 1) / o.sum(), 1 / np.clip(1 - p_ctr, 0.01, 1) / n.sum())
    np.testing.assert_allclose(g_uncvr.numpy(), w * (p_uncvr - (1 - p_cvr)) / (p_uncvr * (1 - p_uncvr)), rtol=1e-4)
    np.testing.assert_allclose(g_cvr.numpy(), w * (p_cvr - (1 - p_uncvr)) / (p_cvr * (1 - p_cvr)), rtol=1e-4)


def test_chorus_ablation_switches_drop_their_terms(batch: dict) -> None:
    terms = make_model("chorus", use_ndm=False, use_sam=False, include_ctr_loss=False)
    keys = set(terms.loss(batch, terms(batch)))
    assert keys == {"ctcvr", "cvr", "uncvr", "total"}
    full = make_model("chorus")
    assert {"ctr", "ctuncvr", "align"} <= set(full.loss(batch, full(batch)))


def test_chorus_plain_matches_unweighted_terms(batch: dict) -> None:
    model = make_model("chorus", cvr_loss="plain")
    out = model(batch)
    terms = model.loss(batch, out)
    torch.testing.assert_close(terms["cvr"], L.cvr_loss_click(out["p_cvr"], batch["click"], batch["conversion"]))
    torch.testing.assert_close(terms["uncvr"], L.uncvr_loss_click(out["p_uncvr"], batch["click"], batch["conversion"]))


def test_nise_total_uses_dynamic_beta(batch: dict) -> None:
    model = make_model("nise")
    terms = model.loss(batch, model(batch))
    cvr = terms["cvr_click"] + terms["cvr_unclick_entropy"]
    ctr, cvr, total = float(terms["ctr"].detach()), float(cvr.detach()), float(terms["total"].detach())
    beta = min(ctr / cvr, 50.0)
    assert float(terms["beta_t"]) == pytest.approx(beta, rel=1e-6)
    assert total == pytest.approx(ctr + beta * cvr, rel=1e-6)


def test_ukd_gradient_reversal_flips_the_discriminator_gradient(batch: dict) -> None:
    from cvr_spark.models.ukd import reverse_gradient

    x = torch.ones(3, requires_grad=True)
    (reverse_gradient(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0, -1.5]))
    # the discriminator learns to predict clicks; the teacher extractor receives the reversed gradient
    model = make_model("ukd", teacher_detach_embedding=True)
    out = model(batch)
    disc = model.loss(batch, out)["teacher_click_disc"]
    disc.backward()
    assert model.embedding.table.weight.grad is None  # teacher reads a detached embedding
    assert model.teacher_extractor.net[0].weight.grad is not None


def test_ukd_soft_label_is_detached_teacher_output(batch: dict) -> None:
    out = make_model("ukd")(batch)
    assert not out["soft_label"].requires_grad
    torch.testing.assert_close(out["soft_label"], out["p_teacher_cvr"].detach())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_presets_build(name: str, preset: str) -> None:
    opts = preset_options(name, preset)
    model = build(name, make_spec(), opts)
    assert model.options() == opts
    assert get(name).paper and model.name == name


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("escm2_ipw", {"ipw_normalization": "batch"}, "ipw_normalization"),
        ("escm2_dr", {"propensity_clamp": 0.0}, "propensity_clamp"),
        ("escm2_ipw", {"backbone": "ple"}, "backbone"),
        ("dcmt", {"weight_cap": -1.0}, "weight_cap"),
        ("ddpo", {"reduction": "avg"}, "reduction"),
        ("nise", {"beta_max": 0.0}, "beta_max"),
        ("chorus", {"cvr_loss": "dr"}, "cvr_loss"),
        ("chorus", {"dropout": [0.1]}, "dropout"),
        ("ukd", {"grl_lambda": -1.0}, "grl_lambda"),
    ],
)
def test_bad_options_name_the_key(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_model(name, **options)


@pytest.mark.parametrize("name", NAMES)
def test_multi_valued_and_dense_inputs(name: str) -> None:
    spec = make_spec(n_multi=2, n_dense=3)
    batch = make_batch(spec, 64, seed=5)
    torch.manual_seed(0)
    model = build(name, spec, {**SMALL, **EXTRA.get(name, {})})
    out = model(batch)
    assert out["p_cvr"].shape == (64,)
    assert params_without_grad(model, batch) == []
