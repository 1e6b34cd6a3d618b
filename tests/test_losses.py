"""Loss terms against hand-computed values (plain math), empty spaces, gradient paths."""
from __future__ import annotations

import math

import pytest
import torch

from cvr_spark import losses

P = [0.9, 0.2, 0.6, 0.3, 0.5]
CLICK = [1.0, 0.0, 1.0, 1.0, 0.0]
CONV = [1.0, 0.0, 0.0, 1.0, 0.0]


def t(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def bce_ref(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_ctr_loss_exposure_matches_formula() -> None:
    expected = sum(bce_ref(p, o) for p, o in zip(P, CLICK)) / len(P)
    assert losses.ctr_loss_exposure(t(P), t(CLICK)).item() == pytest.approx(expected, rel=1e-9)


def test_ctcvr_loss_exposure_uses_click_times_conversion() -> None:
    conv = [1.0, 1.0, 0.0, 1.0, 0.0]  # row 1: conversion without click must count as 0
    expected = sum(bce_ref(p, o * r) for p, o, r in zip(P, CLICK, conv)) / len(P)
    got = losses.ctcvr_loss_exposure(t(P), t(CLICK), t(conv)).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_cvr_loss_click_averages_over_clicked_rows_only() -> None:
    clicked = [(p, r) for p, o, r in zip(P, CLICK, CONV) if o == 1]
    expected = sum(bce_ref(p, r) for p, r in clicked) / len(clicked)
    assert losses.cvr_loss_click(t(P), t(CLICK), t(CONV)).item() == pytest.approx(expected, rel=1e-9)


def test_ctnocvr_label_is_click_and_no_conversion() -> None:
    assert losses.ctnocvr_label(t(CLICK), t(CONV)).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert losses.ctcvr_label(t(CLICK), t(CONV)).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_ctnocvr_loss_exposure_matches_formula() -> None:
    expected = sum(bce_ref(p, o * (1 - r)) for p, o, r in zip(P, CLICK, CONV)) / len(P)
    got = losses.ctnocvr_loss_exposure(t(P), t(CLICK), t(CONV)).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_calibrator_loss_exposure_matches_formula_and_has_no_stop_gradient() -> None:
    upper, lower = [0.5, 0.2, 0.1, 0.9, 0.3], [0.6, 0.1, 0.4, 0.9, 0.2]
    expected = sum(max(lo - up, 0.0) for up, lo in zip(upper, lower)) / len(upper)
    pu, pl = t(upper, grad=True), t(lower, grad=True)
    value = losses.calibrator_loss_exposure(pu, pl)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    # d/d lower = 1/B where lower > upper (rows 0 and 2), d/d upper the negative.
    assert pl.grad.tolist() == pytest.approx([0.2, 0.0, 0.2, 0.0, 0.0])
    assert pu.grad.tolist() == pytest.approx([-0.2, 0.0, -0.2, 0.0, 0.0])


def test_l2_penalty_is_half_sum_of_squares() -> None:
    a, b = t([1.0, -2.0]), t([[0.5, 0.5], [3.0, 0.0]])
    assert losses.l2_penalty([a, b]).item() == pytest.approx((1 + 4 + 0.25 + 0.25 + 9) / 2)
    with pytest.raises(ValueError, match="no parameters"):
        losses.l2_penalty([])


def test_bce_clamps_extreme_probabilities() -> None:
    value = losses.ctr_loss_exposure(t([0.0, 1.0]), t([1.0, 0.0]))
    assert math.isfinite(value.item())
    assert value.item() == pytest.approx(-math.log(losses.EPS), rel=1e-6)


@pytest.mark.parametrize(
    "term",
    [
        lambda p, o, r: losses.cvr_loss_click(p, o, r),
        lambda p, o, r: losses.ctr_loss_exposure(p, o),
        lambda p, o, r: losses.ctcvr_loss_exposure(p, o, r),
        lambda p, o, r: losses.ctnocvr_loss_exposure(p, o, r),
        lambda p, o, r: losses.calibrator_loss_exposure(p, p * 0.5),
    ],
)
def test_empty_click_space_gives_finite_loss(term) -> None:
    p = t(P, grad=True)
    zeros = t([0.0] * len(P))
    value = term(p, zeros, zeros)
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(p.grad).all()


def test_cvr_loss_click_is_zero_without_clicks() -> None:
    p = t(P, grad=True)
    zeros = t([0.0] * len(P))
    value = losses.cvr_loss_click(p, zeros, zeros)
    assert value.item() == 0.0
    value.backward()
    assert p.grad.abs().sum().item() == 0.0


def test_empty_batch_gives_zero() -> None:
    empty = t([])
    assert losses.ctr_loss_exposure(empty, empty).item() == 0.0
    assert losses.cvr_loss_click(empty, empty, empty).item() == 0.0


def test_inverse_propensity_passes_no_gradient() -> None:
    p = t([0.5, 0.001, 0.2], grad=True)
    y = t([1.0, 0.0, 1.0], grad=True)
    w = losses.inverse_propensity(p, clamp_min=0.01, cap=50.0)
    assert not w.requires_grad
    assert w.tolist() == pytest.approx([2.0, 50.0, 5.0])
    (w * y).sum().backward()
    assert p.grad is None
    assert y.grad.tolist() == pytest.approx([2.0, 50.0, 5.0])


def test_shape_mismatch_names_the_arguments() -> None:
    with pytest.raises(ValueError, match="p_cvr has shape"):
        losses.cvr_loss_click(t([0.5, 0.5]), t([1.0, 0.0, 1.0]), t([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="p_ctr has shape"):
        losses.ctr_loss_exposure(t([[0.5, 0.5]]), t([1.0, 0.0]))
