"""compute_metrics on hand-made predictions, checked against values computed independently."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cvr_spark.evaluate.metrics import METRIC_SPACES, compute_metrics, gauc


def pair_auc(y, s) -> float:
    """AUC by counting (positive, negative) pairs: 1 if ordered right, 1/2 on a tie."""
    pos, neg = [b for a, b in zip(y, s) if a == 1], [b for a, b in zip(y, s) if a == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def manual_logloss(y, p) -> float:
    return -sum(a * math.log(b) + (1 - a) * math.log(1 - b) for a, b in zip(y, p)) / len(y)


@pytest.fixture(scope="module")
def pred() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 80
    click = (rng.random(n) < 0.4).astype(np.int64)
    conv = click * (rng.random(n) < 0.5)
    p_ctr = np.clip(np.round(0.3 * click + rng.random(n) * 0.6, 1), 0.05, 0.95)  # rounded: ties
    p_cvr = np.clip(np.round(0.15 * conv + 0.35 * click + rng.random(n) * 0.5, 2), 0.01, 0.99)
    return {"click": click, "conversion": conv, "p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr,
            "p_other": rng.random(n), "user_key": rng.integers(-1, 7, n)}


def test_auc_spaces_match_pair_counting(pred):
    m = compute_metrics(pred)
    c, r = pred["click"], pred["conversion"]
    o = c == 1
    assert m["ctr_auc"] == pytest.approx(pair_auc(c, pred["p_ctr"]))
    assert m["cvr_auc_clicked"] == pytest.approx(pair_auc(r[o], pred["p_cvr"][o]))
    assert m["cvr_auc_all"] == pytest.approx(pair_auc(r, pred["p_cvr"]))
    assert m["ctcvr_auc"] == pytest.approx(pair_auc(c * r, pred["p_ctcvr"]))
    assert abs(m["cvr_auc_clicked"] - m["cvr_auc_all"]) > 0.01, "the two CVR spaces must differ here"
    assert (m["n_impressions"], m["n_clicks"], m["n_conversions"]) == (80, int(c.sum()), int(r.sum()))
    other = compute_metrics(pred, cvr_key="p_other", ctcvr_key="p_other")
    assert other["cvr_auc_all"] == pytest.approx(pair_auc(r, pred["p_other"]))
    assert other["ctcvr_auc"] == pytest.approx(pair_auc(c * r, pred["p_other"]))
    assert other["ctr_auc"] == m["ctr_auc"] and other["cvr_score"] == "p_other"
    scalar = [k for k, v in m.items() if isinstance(v, float)]
    assert set(scalar) <= set(METRIC_SPACES), "every metric names its sample space"


def test_logloss_and_pcoc_spaces(pred):
    m = compute_metrics(pred)
    c, r, o = pred["click"], pred["conversion"], pred["click"] == 1
    assert m["logloss_ctr"] == pytest.approx(manual_logloss(c, pred["p_ctr"]))
    assert m["logloss_cvr_clicked"] == pytest.approx(manual_logloss(r[o], pred["p_cvr"][o]))
    assert m["logloss_ctcvr"] == pytest.approx(manual_logloss(c * r, pred["p_ctcvr"]))
    assert m["pcoc_ctr"] == pytest.approx(pred["p_ctr"].sum() / c.sum())
    assert m["pcoc_cvr_clicked"] == pytest.approx(pred["p_cvr"][o].sum() / r[o].sum())
    assert m["pcoc_ctcvr"] == pytest.approx(pred["p_ctcvr"].sum() / (c * r).sum())


def test_pcoc_by_pctr_bucket_by_hand():
    p_ctr = np.array([0.9, 0.1, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6])
    click = np.array([1, 0, 1, 1, 0, 0, 1, 1])
    conv = np.array([1, 0, 0, 1, 0, 0, 1, 0])
    p_ctcvr = np.full(8, 0.25)
    m = compute_metrics({"click": click, "conversion": conv, "p_ctr": p_ctr, "p_cvr": np.full(8, 0.5),
                         "p_ctcvr": p_ctcvr}, pctr_buckets=4)
    buckets = m["pcoc_by_pctr_bucket"]
    # sorted by p_ctr: (0.1,0.2) (0.3,0.4) (0.6,0.7) (0.8,0.9); clicks 1,1,1,2; ctcvr 0,1,0,2
    assert [b["n"] for b in buckets] == [2, 2, 2, 2]
    assert [b["pctr_min"] for b in buckets] == [0.1, 0.3, 0.6, 0.8]
    assert [b["ctr_pcoc"] for b in buckets] == pytest.approx([0.3 / 1, 0.7 / 1, 1.3 / 1, 1.7 / 2])
    assert buckets[1]["ctcvr_pcoc"] == pytest.approx(0.5) and buckets[3]["ctcvr_pcoc"] == pytest.approx(0.25)
    assert math.isnan(buckets[0]["ctcvr_pcoc"]) and math.isnan(buckets[2]["ctcvr_pcoc"])
    assert [b["ctr"] for b in buckets] == [0.5, 0.5, 0.5, 1.0]


def test_gauc_weights_users_with_both_classes(pred):
    m = compute_metrics(pred)
    u, c, s = pred["user_key"], pred["click"], pred["p_ctr"]
    num = den = users = 0
    for user in np.unique(u[u >= 0]):
        sel = u == user
        if 0 < c[sel].sum() < sel.sum():
            num += sel.sum() * pair_auc(c[sel], s[sel])
            den += sel.sum()
            users += 1
    assert m["gauc_ctr"] == pytest.approx(num / den) and m["gauc_users"] == users
    # a user with one class only is left out; no eligible user -> NaN
    g, k = gauc(np.array([1, 1, 2, 2, 2]), np.array([1, 0, 1, 1, 1]), np.array([0.2, 0.1, 0.5, 0.4, 0.3]))
    assert (g, k) == (1.0, 1)
    assert math.isnan(gauc(np.array([1, 1]), np.array([1, 1]), np.array([0.1, 0.2]))[0])
    big = np.array([2**62 + 1, 2**62 + 1, 2**62 + 2, 2**62 + 2])  # 64-bit hashes stay distinct
    one = {"click": np.array([1, 0, 0, 1]), "conversion": np.zeros(4), "p_ctr": np.array([0.9, 0.1, 0.8, 0.2]),
           "p_cvr": np.full(4, 0.1), "p_ctcvr": np.full(4, 0.05), "user_key": big}
    assert compute_metrics(one)["gauc_ctr"] == pytest.approx(0.5) and compute_metrics(one)["gauc_users"] == 2


def test_truth_metrics(pred):
    rng = np.random.default_rng(1)
    n = len(pred["click"])
    p_true = rng.random(n) * 0.5
    potential = np.maximum(pred["conversion"], (rng.random(n) < p_true).astype(int))
    m = compute_metrics(pred, truth={"p_cvr_true": p_true, "potential_conversion": potential}, pctr_buckets=4)
    assert m["cvr_auc_true_all"] == pytest.approx(pair_auc(potential, pred["p_cvr"]))
    assert m["cvr_true_mae"] == pytest.approx(np.mean(np.abs(pred["p_cvr"] - p_true)))
    assert m["cvr_true_pcoc"] == pytest.approx(pred["p_cvr"].sum() / p_true.sum())
    table = m["cvr_true_reliability"]
    assert len(table) == 4 and sum(b["n"] for b in table) == n
    order = np.argsort(pred["p_cvr"], kind="stable")[:20]
    assert table[0]["pred_mean"] == pytest.approx(pred["p_cvr"][order].mean())
    assert table[0]["true_mean"] == pytest.approx(p_true[order].mean())
    assert "cvr_auc_true_all" not in compute_metrics(pred)
    with pytest.raises(ValueError, match="truth: 'p_cvr_true' has shape"):
        compute_metrics(pred, truth={"p_cvr_true": p_true[:5]})


def test_one_class_and_empty_spaces_give_nan():
    no_clicks = {"click": np.zeros(5), "conversion": np.zeros(5), "p_ctr": np.full(5, 0.1),
                 "p_cvr": np.full(5, 0.2), "p_ctcvr": np.full(5, 0.02)}
    m = compute_metrics(no_clicks)
    for k in ("ctr_auc", "cvr_auc_clicked", "cvr_auc_all", "ctcvr_auc", "logloss_cvr_clicked",
              "pcoc_ctr", "pcoc_cvr_clicked", "pcoc_ctcvr", "gauc_ctr"):
        assert math.isnan(m[k]), k
    assert m["logloss_ctr"] == pytest.approx(-math.log(0.9))
    assert any("cvr_auc_clicked: empty sample space" in s for s in m["notes"])
    assert any("ctr_auc: only label 0" in s for s in m["notes"])
    empty = compute_metrics({k: np.zeros(0) for k in no_clicks})
    assert math.isnan(empty["ctr_auc"]) and empty["pcoc_by_pctr_bucket"] == [] and empty["n_impressions"] == 0


def test_bad_input_is_named():
    good = {"click": np.array([1, 0]), "conversion": np.array([1, 0]), "p_ctr": np.array([0.5, 0.5]),
            "p_cvr": np.array([0.5, 0.5]), "p_ctcvr": np.array([0.2, 0.2])}
    with pytest.raises(KeyError, match="'p_ctcvr' missing"):
        compute_metrics({k: v for k, v in good.items() if k != "p_ctcvr"})
    with pytest.raises(ValueError, match=r"'p_cvr' has shape \(3,\), expected \[2\]"):
        compute_metrics({**good, "p_cvr": np.array([0.1, 0.2, 0.3])})
    with pytest.raises(ValueError, match="conversion=1 with click=0"):
        compute_metrics({**good, "click": np.array([0, 0])})
    with pytest.raises(ValueError, match=r"'p_ctr' must be probabilities"):
        compute_metrics({**good, "p_ctr": np.array([1.5, 0.1])})
    with pytest.raises(ValueError, match="'conversion' must be 0/1"):
        compute_metrics({**good, "conversion": np.array([2, 0])})
