"""Loss terms of cvr_spark.losses against independent numpy formulas, their
stop-gradients, and finiteness on empty click / unclick spaces."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cvr_spark import losses as L

# A hand-made batch: 3 clicks (one converted), 3 non-clicks; p_ctr[2] = 0.005 is below the
# 0.01 propensity clamp.
P_CTR = np.array([0.9, 0.4, 0.005, 0.6, 0.2, 0.7])
CLICK = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
CONV = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
P_CVR = np.array([0.7, 0.3, 0.2, 0.5, 0.1, 0.8])
P_OTHER = np.array([0.2, 0.6, 0.5, 0.3, 0.4, 0.1])  # unCVR / counterfactual / q / ê
O, N = CLICK == 1, CLICK == 0


def nbce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def nbce_grad(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d BCE(p, y) / d p with y constant."""
    return (p - y) / (p * (1 - p))


def t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def close(x: torch.Tensor, ref: float) -> None:
    assert float(x.detach()) == pytest.approx(float(ref), rel=1e-6, abs=1e-9)


W_O = 1.0 / np.clip(P_CTR, 0.01, 1.0)  # inverse propensity on O (clamped)
W_N = 1.0 / np.clip(1 - P_CTR, 0.01, 1.0)


# ----------------------------------------------------------------------------- values
def test_esmm_style_terms() -> None:
    close(L.ctr_loss_exposure(t(P_CTR), t(CLICK)), nbce(P_CTR, CLICK).mean())
    close(L.ctcvr_loss_exposure(t(P_CTR * P_CVR), t(CLICK), t(CONV)), nbce(P_CTR * P_CVR, CLICK * CONV).mean())
    close(L.cvr_loss_click(t(P_CVR), t(CLICK), t(CONV)), nbce(P_CVR[O], CONV[O]).mean())


def test_ipw_weights_clamp_cap_and_self_normalisation() -> None:
    w = L.ipw_weights_click(t(P_CTR), t(CLICK), 0.01).numpy()
    np.testing.assert_allclose(w, np.where(O, W_O, 0.0))
    assert w[2] == pytest.approx(100.0)
    capped = L.ipw_weights_click(t(P_CTR), t(CLICK), 0.01, cap=15.0).numpy()
    np.testing.assert_allclose(capped, np.where(O, np.minimum(W_O, 15.0), 0.0))
    sn = L.ipw_weights_click(t(P_CTR), t(CLICK), 0.01, self_normalize=True).numpy()
    np.testing.assert_allclose(sn, np.where(O, W_O / W_O[O].mean(), 0.0))
    wn = L.ipw_weights_unclick(t(P_CTR), t(CLICK), 0.01).numpy()
    np.testing.assert_allclose(wn, np.where(N, W_N, 0.0))


def test_ipw_bce_click_and_unclick() -> None:
    close(L.ipw_bce_loss_click(t(P_CVR), t(CONV), t(P_CTR), t(CLICK)), (W_O * nbce(P_CVR, CONV))[O].sum() / 3)
    close(L.ipw_bce_loss_unclick(t(P_CVR), t(CONV), t(P_CTR), t(CLICK)), (W_N * nbce(P_CVR, CONV))[N].sum() / 3)
    sn = W_O[O] / W_O[O].mean()
    ref = (sn * nbce(P_CVR, CONV)[O]).sum() / 3
    close(L.ipw_bce_loss_click(t(P_CVR), t(CONV), t(P_CTR), t(CLICK), self_normalize=True), ref)


def test_escm2_ipw_normalisations_and_cap() -> None:
    per_row = np.where(O, W_O * nbce(P_CVR, CONV), 0.0)
    args = (t(P_CVR), t(P_CTR), t(CLICK), t(CONV))
    close(L.escm2_ipw_cvr_loss(*args, normalization="exposure"), per_row.sum() / 6)
    close(L.escm2_ipw_cvr_loss(*args, normalization="click"), per_row.sum() / 3)
    capped = np.where(O, np.minimum(W_O, 15.0) * nbce(P_CVR, CONV), 0.0)
    close(L.escm2_ipw_cvr_loss(*args, cap=15.0), capped.sum() / 6)
    with pytest.raises(ValueError, match="normalization"):
        L.escm2_ipw_cvr_loss(*args, normalization="batch")


def test_escm2_dr_terms() -> None:
    e, e_hat = nbce(P_CVR, CONV), P_OTHER
    err_ref = (e_hat + CLICK * (e - e_hat) * W_O).sum() / 6
    imp_ref = (CLICK * (e - e_hat) ** 2 * W_O).sum() / 6
    args = (t(P_CVR), t(e_hat), t(P_CTR), t(CLICK), t(CONV))
    close(L.escm2_dr_error_loss(*args), err_ref)
    close(L.escm2_dr_imputation_loss(*args), imp_ref)
    close(L.escm2_dr_imputation_loss(*args, normalization="click"), imp_ref * 6 / 3)


def test_escm2_dr_detach_error_stops_gradient_to_cvr() -> None:
    p_cvr, e_hat = t(P_CVR, True), t(P_OTHER, True)
    L.escm2_dr_imputation_loss(p_cvr, e_hat, t(P_CTR), t(CLICK), t(CONV), detach_error=True).backward()
    assert p_cvr.grad is None and e_hat.grad is not None and bool(e_hat.grad[O].ne(0).all())
    p_cvr = t(P_CVR, True)
    L.escm2_dr_imputation_loss(p_cvr, t(P_OTHER), t(P_CTR), t(CLICK), t(CONV)).backward()
    assert bool(p_cvr.grad[O].ne(0).all())


def test_dcmt_twin_terms() -> None:
    ref = (CLICK * nbce(P_CVR, CONV) * W_O + (1 - CLICK) * nbce(P_OTHER, 1 - CONV) * W_N).sum() / 6
    close(L.dcmt_twin_ipw_loss_exposure(t(P_CVR), t(P_OTHER), t(P_CTR), t(CLICK), t(CONV)), ref)
    close(L.twin_constraint_loss_exposure(t(P_CVR), t(P_OTHER)), np.abs(1 - (P_CVR + P_OTHER)).mean())


def test_bernoulli_kl_and_uncertainty_distillation() -> None:
    def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))

    np.testing.assert_allclose(L.bernoulli_kl(t(P_CVR), t(P_OTHER)).numpy(), kl(P_CVR, P_OTHER))
    soft = np.array([0.3, 0.3, 0.3, 0.25, 0.05, 0.6])
    kd = 0.5 * (nbce(P_CVR, soft) + nbce(P_OTHER, soft))
    u = 0.5 * (kl(P_CVR, P_OTHER) + kl(P_OTHER, P_CVR))
    ref = (np.exp(-u) * kd + u)[N].mean()
    close(L.uncertainty_distill_loss_unclick(t(P_CVR), t(P_OTHER), t(soft), t(CLICK)), ref)


def test_uncertainty_distillation_gradients() -> None:
    soft = t(np.full(6, 0.3), True)
    p_a, p_b = t(P_CVR, True), t(P_OTHER, True)
    L.uncertainty_distill_loss_unclick(p_a, p_b, soft, t(CLICK)).backward()
    assert soft.grad is None  # pseudo-labels are constants
    assert bool(p_a.grad[O].eq(0).all()) and bool(p_a.grad[N].ne(0).all())
    # detach_uncertainty: exp(-u) is a constant weight, so the gradient is exp(-u) dKD/dp.
    p_a, p_b = t(P_CVR, True), t(P_OTHER, True)
    L.uncertainty_distill_loss_unclick(p_a, p_b, t(np.full(6, 0.3)), t(CLICK), detach_uncertainty=True).backward()
    u = 0.5 * (L.bernoulli_kl(t(P_CVR), t(P_OTHER)) + L.bernoulli_kl(t(P_OTHER), t(P_CVR))).numpy()
    ref = np.where(N, np.exp(-u) * 0.5 * nbce_grad(P_CVR, np.full(6, 0.3)) / 3, 0.0)
    np.testing.assert_allclose(p_a.grad.numpy(), ref, rtol=1e-6)


def test_nise_terms_and_entropy_gradient_through_target() -> None:
    close(L.cvr_loss_click_over_exposure(t(P_CVR), t(CLICK), t(CONV)), nbce(P_CVR[O], CONV[O]).sum() / 6)
    entropy = -(P_CVR * np.log(P_CVR) + (1 - P_CVR) * np.log(1 - P_CVR))
    p = t(P_CVR, True)
    loss = L.entropy_loss_unclick_over_exposure(p, t(CLICK))
    close(loss, entropy[N].sum() / 6)
    loss.backward()
    # d H(p)/dp = log((1-p)/p): only true if BCE passes gradient to its (undetached) target.
    ref = np.where(N, np.log((1 - P_CVR) / P_CVR) / 6, 0.0)
    np.testing.assert_allclose(p.grad.numpy(), ref, rtol=1e-6, atol=1e-12)
    assert bool(p.grad[4:].ne(0).all())  # p = 0.5 (row 3) is the entropy's stationary point


def test_nise_dynamic_weight() -> None:
    assert L.nise_dynamic_weight(torch.tensor(0.6), torch.tensor(0.2), 1.0, 50.0) == pytest.approx(3.0)
    assert L.nise_dynamic_weight(torch.tensor(0.6), torch.tensor(0.001), 0.5, 50.0) == pytest.approx(25.0)
    assert L.nise_dynamic_weight(torch.tensor(0.6), torch.tensor(0.0), 1.0, 50.0) == pytest.approx(50.0)


def _ddpo_reference(reduction: str) -> tuple[float, float]:
    y_soft = np.minimum(CONV + P_OTHER, 1.0)
    w = 1.0 / np.maximum(P_CTR, 1e-6)
    w = w / (CLICK * w).sum()
    wn = 1.0 / np.maximum(1 - P_CTR, 1e-6)
    wn = wn / ((1 - CLICK) * wn).sum()
    lo = CLICK * w * nbce(P_CVR, y_soft)
    ln = (1 - CLICK) * wn * nbce(P_CVR, P_OTHER)
    red = np.mean if reduction == "mean" else np.sum
    return float(red(lo)), float(red(ln))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ddpo_terms(reduction: str) -> None:
    ref_o, ref_n = _ddpo_reference(reduction)
    close(L.ddpo_click_loss(t(P_CVR), t(P_OTHER), t(P_CTR), t(CLICK), t(CONV), reduction), ref_o)
    close(L.ddpo_unclick_loss(t(P_CVR), t(P_OTHER), t(P_CTR), t(CLICK), reduction), ref_n)
    np.testing.assert_allclose(L.ddpo_soft_cvr_label(t(CONV), t(P_OTHER)).numpy(), np.minimum(CONV + P_OTHER, 1))


def test_ddpo_soft_labels_and_weights_pass_no_gradient() -> None:
    q, p_ctr, p_cvr = t(P_OTHER, True), t(P_CTR, True), t(P_CVR, True)
    (L.ddpo_click_loss(p_cvr, q, p_ctr, t(CLICK), t(CONV)) + L.ddpo_unclick_loss(p_cvr, q, p_ctr, t(CLICK))).backward()
    assert q.grad is None and p_ctr.grad is None and p_cvr.grad is not None


def test_ddpo_empty_space_uses_clipped_weights() -> None:
    w = L.ddpo_selfnorm_weights(t(np.full(6, 1e-9)), t(np.zeros(6)))
    np.testing.assert_allclose(w.numpy(), np.full(6, 15.0))


def test_chorus_terms() -> None:
    close(L.uncvr_loss_click(t(P_OTHER), t(CLICK), t(CONV)), nbce(P_OTHER[O], 1 - CONV[O]).mean())
    p_ctuncvr = P_CTR * P_OTHER
    ref = nbce(p_ctuncvr, CLICK * (1 - CONV)).mean()
    close(L.ctuncvr_loss_exposure(t(p_ctuncvr), t(CLICK), t(CONV)), ref)
    y_cvr, y_uncvr = 1 - P_OTHER, 1 - P_CVR
    align = sum(
        (W_O * nbce(p, y))[O].sum() / 3 + (W_N * nbce(p, y))[N].sum() / 3
        for p, y in ((P_CVR, y_cvr), (P_OTHER, y_uncvr))
    )
    close(L.chorus_align_loss(t(P_CVR), t(P_OTHER), t(P_CTR), t(CLICK)), align)


def align_grad_reference(p_cvr: np.ndarray, p_uncvr: np.ndarray, p_ctr: np.ndarray, click: np.ndarray) -> np.ndarray:
    """d L_align / d p_uncvr with the soft labels as constants (numpy)."""
    o, n = click == 1, click == 0
    w = np.where(o, 1 / np.clip(p_ctr, 0.01, 1) / max(o.sum(), 1), 1 / np.clip(1 - p_ctr, 0.01, 1) / max(n.sum(), 1))
    return w * nbce_grad(p_uncvr, 1 - p_cvr)


def test_chorus_soft_labels_are_detached() -> None:
    p_cvr, p_uncvr = t(P_CVR, True), t(P_OTHER, True)
    y_cvr, y_uncvr = L.aligned_soft_labels(p_cvr, p_uncvr)
    assert not y_cvr.requires_grad and not y_uncvr.requires_grad
    p_ctr = t(P_CTR, True)
    L.chorus_align_loss(p_cvr, p_uncvr, p_ctr, t(CLICK)).backward()
    assert p_ctr.grad is None
    np.testing.assert_allclose(p_uncvr.grad.numpy(), align_grad_reference(P_CVR, P_OTHER, P_CTR, CLICK), rtol=1e-6)


# ----------------------------------------------------------------------------- generic properties
def _all_terms(p_cvr, p_other, p_ctr, click, conv) -> dict:  # noqa: ANN001 - test table
    return {
        "ctr": lambda: L.ctr_loss_exposure(p_ctr, click),
        "ctcvr": lambda: L.ctcvr_loss_exposure(p_ctr * p_cvr, click, conv),
        "cvr_click": lambda: L.cvr_loss_click(p_cvr, click, conv),
        "ipw_click": lambda: L.ipw_bce_loss_click(p_cvr, conv, p_ctr, click, self_normalize=True),
        "ipw_unclick": lambda: L.ipw_bce_loss_unclick(p_cvr, conv, p_ctr, click, self_normalize=True),
        "escm2_ipw_d": lambda: L.escm2_ipw_cvr_loss(p_cvr, p_ctr, click, conv),
        "escm2_ipw_o": lambda: L.escm2_ipw_cvr_loss(p_cvr, p_ctr, click, conv, normalization="click"),
        "dr_error": lambda: L.escm2_dr_error_loss(p_cvr, p_other, p_ctr, click, conv),
        "dr_imp": lambda: L.escm2_dr_imputation_loss(p_cvr, p_other, p_ctr, click, conv, normalization="click"),
        "dcmt": lambda: L.dcmt_twin_ipw_loss_exposure(p_cvr, p_other, p_ctr, click, conv),
        "twin": lambda: L.twin_constraint_loss_exposure(p_cvr, p_other),
        "ukd": lambda: L.uncertainty_distill_loss_unclick(p_cvr, p_other, p_other, click),
        "nise_o": lambda: L.cvr_loss_click_over_exposure(p_cvr, click, conv),
        "nise_n": lambda: L.entropy_loss_unclick_over_exposure(p_cvr, click),
        "ddpo_o": lambda: L.ddpo_click_loss(p_cvr, p_other, p_ctr, click, conv),
        "ddpo_n": lambda: L.ddpo_unclick_loss(p_cvr, p_other, p_ctr, click),
        "uncvr": lambda: L.uncvr_loss_click(p_other, click, conv),
        "ctuncvr": lambda: L.ctuncvr_loss_exposure(p_ctr * p_other, click, conv),
        "align": lambda: L.chorus_align_loss(p_cvr, p_other, p_ctr, click, self_normalize=True),
    }


@pytest.mark.parametrize("clicks", [0.0, 1.0], ids=["no_click", "all_click"])
def test_every_term_finite_with_gradient_on_empty_space(clicks: float) -> None:
    click = torch.full((6,), clicks, dtype=torch.float64)
    conv = click * torch.tensor(CONV)
    p_cvr, p_other, p_ctr = t(P_CVR, True), t(P_OTHER, True), t(np.array([0.0, 1.0, 0.5, 1e-9, 0.999, 0.3]), True)
    for name, fn in _all_terms(p_cvr, p_other, p_ctr, click, conv).items():
        value = fn()
        assert math.isfinite(float(value.detach())), name
        if value.requires_grad:
            value.backward()
    for p in (p_cvr, p_other, p_ctr):
        assert p.grad is None or bool(torch.isfinite(p.grad).all())


def test_empty_space_terms_are_zero() -> None:
    no_click = torch.zeros(6, dtype=torch.float64)
    assert float(L.cvr_loss_click(t(P_CVR), no_click, no_click)) == 0.0
    assert float(L.ipw_bce_loss_click(t(P_CVR), no_click, t(P_CTR), no_click)) == 0.0
    assert float(L.ddpo_click_loss(t(P_CVR), t(P_OTHER), t(P_CTR), no_click, no_click)) == 0.0
    all_click = torch.ones(6, dtype=torch.float64)
    assert float(L.entropy_loss_unclick_over_exposure(t(P_CVR), all_click)) == 0.0
    assert float(L.uncertainty_distill_loss_unclick(t(P_CVR), t(P_OTHER), t(P_OTHER), all_click)) == 0.0


@pytest.mark.parametrize(
    "name", ["ipw_click", "ipw_unclick", "escm2_ipw_d", "dr_error", "dr_imp", "dcmt", "ddpo_o", "ddpo_n", "align"]
)
def test_propensity_weights_pass_no_gradient_to_ctr(name: str) -> None:
    p_ctr = t(P_CTR, True)
    _all_terms(t(P_CVR, True), t(P_OTHER, True), p_ctr, t(CLICK), t(CONV))[name]().backward()
    assert p_ctr.grad is None


def test_shape_mismatch_names_the_arguments() -> None:
    with pytest.raises(ValueError, match="p_cvr"):
        L.escm2_ipw_cvr_loss(t(P_CVR[:5]), t(P_CTR), t(CLICK), t(CONV))
    with pytest.raises(ValueError, match="reduction"):
        L.ddpo_click_loss(t(P_CVR), t(P_OTHER), t(P_CTR), t(CLICK), t(CONV), reduction="avg")
