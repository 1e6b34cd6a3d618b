"""Evaluation metrics, each named by the sample space it runs on (DESIGN.md "Evaluation").

Spaces (MODELS.md §0): D = all impressions, O = clicked impressions, R = converted ones.
Every AUC is sklearn's exact ``roc_auc_score`` over the whole set (never a batch average);
a space that is empty or holds one class gives NaN and a line in ``notes``, never a crash.

Example::

    m = compute_metrics({"click": o, "conversion": r, "p_ctr": pc, "p_cvr": pv, "p_ctcvr": pc * pv})
    m["cvr_auc_clicked"], m["cvr_auc_all"]   # CVR AUC on O and on D
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7  # predictions are clipped to [EPS, 1 - EPS] for logloss only

METRIC_SPACES: dict[str, str] = {
    "ctr_auc": "D (all impressions): click label, score p_ctr",
    "cvr_auc_clicked": "O (clicked impressions): conversion label, CVR score",
    "cvr_auc_all": "D (all impressions): conversion label, CVR score",
    "ctcvr_auc": "D (all impressions): click*conversion label, CTCVR score",
    "logloss_ctr": "D (all impressions): click label, p_ctr",
    "logloss_cvr_clicked": "O (clicked impressions): conversion label, CVR score",
    "logloss_ctcvr": "D (all impressions): click*conversion label, CTCVR score",
    "pcoc_ctr": "D: sum p_ctr / sum click",
    "pcoc_cvr_clicked": "O: sum CVR score / sum conversion",
    "pcoc_ctcvr": "D: sum CTCVR score / sum click*conversion",
    "pcoc_by_pctr_bucket": "D in equal-count p_ctr quantile buckets: CTR and CTCVR PCOC per bucket",
    "gauc_ctr": "D by user_key: impression-weighted mean of per-user CTR AUC, users with both classes",
    "cvr_auc_true_all": "D (all impressions): potential conversion (simulator truth), CVR score",
    "cvr_true_mae": "D: mean |CVR score - true p_cvr|",
    "cvr_true_pcoc": "D: sum CVR score / sum true p_cvr",
    "cvr_true_reliability": "D in equal-count CVR-score buckets: mean predicted vs mean true p_cvr",
    "n_impressions": "D: row count",
    "n_clicks": "O: row count",
    "n_conversions": "R: row count",
    "gauc_users": "users with both click classes (GAUC's population)",
}
TRUTH_METRICS = ("cvr_auc_true_all", "cvr_true_mae", "cvr_true_pcoc", "cvr_true_reliability")


def _column(data: Mapping[str, np.ndarray], key: str, n: int | None, what: str) -> np.ndarray:
    """``data[key]`` as a finite float64 vector of length ``n`` (a [N, 1] column is flattened)."""
    if key not in data:
        raise KeyError(f"{what}: key '{key}' missing (have {sorted(data)})")
    arr = np.asarray(data[key], dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise ValueError(f"{what}: '{key}' has shape {arr.shape}, expected [{n if n is not None else 'N'}]")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: '{key}' has {int((~np.isfinite(arr)).sum())} NaN/inf values")
    return arr


def _user_keys(pred: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """``pred['user_key']`` as int64 [N] (kept integer: 64-bit hashes do not fit a float64)."""
    keys = np.asarray(pred["user_key"])
    if keys.shape != (n,) or not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"pred: 'user_key' has shape {keys.shape} dtype {keys.dtype}, expected int [{n}]")
    return keys.astype(np.int64, copy=False)


def _labels(data: Mapping[str, np.ndarray], key: str, n: int | None, what: str) -> np.ndarray:
    y = _column(data, key, n, what)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{what}: '{key}' must be 0/1, found values {np.unique(y)[:5].tolist()}")
    return y


def _probs(data: Mapping[str, np.ndarray], key: str, n: int, what: str) -> np.ndarray:
    p = _column(data, key, n, what)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"{what}: '{key}' must be probabilities in [0, 1], found {p.min()}..{p.max()}")
    return p


def auc(y: np.ndarray, score: np.ndarray, name: str, notes: list[str]) -> float:
    """Exact ROC AUC; NaN (with a note) when the space is empty or has one class."""
    if y.size == 0:
        notes.append(f"{name}: empty sample space, NaN")
        return math.nan
    if y.min() == y.max():
        notes.append(f"{name}: only label {int(y[0])} in its sample space ({y.size} rows), NaN")
        return math.nan
    return float(roc_auc_score(y, score))


def logloss(y: np.ndarray, p: np.ndarray, name: str, notes: list[str]) -> float:
    """Mean binary cross-entropy (predictions clipped to [EPS, 1-EPS]); NaN on an empty space."""
    if y.size == 0:
        notes.append(f"{name}: empty sample space, NaN")
        return math.nan
    return float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))


def pcoc(p: np.ndarray, y: np.ndarray, name: str | None = None, notes: list[str] | None = None) -> float:
    """Predicted over observed: ``sum(p) / sum(y)``; NaN when nothing was observed."""
    if y.sum() <= 0:
        if name is not None and notes is not None:
            notes.append(f"{name}: no positives in its sample space, NaN")
        return math.nan
    return float(p.sum() / y.sum())


def equal_count_buckets(score: np.ndarray, k: int) -> list[np.ndarray]:
    """Row indices of ``k`` equal-count quantile buckets of ``score``, lowest scores first.

    Ranks (a stable sort) decide membership, so ties may straddle a boundary but every bucket
    has ``n // k`` or ``n // k + 1`` rows.
    """
    k = max(1, min(int(k), score.size))
    return np.array_split(np.argsort(score, kind="stable"), k) if score.size else []


def pcoc_by_pctr_bucket(click: np.ndarray, ctcvr: np.ndarray, p_ctr: np.ndarray, p_ctcvr: np.ndarray,
                        k: int) -> list[dict]:
    """Per p_ctr quantile bucket: size, p_ctr range, observed CTR, CTR PCOC and CTCVR PCOC."""
    rows = []
    for b, idx in enumerate(equal_count_buckets(p_ctr, k)):
        rows.append({
            "bucket": b, "n": int(idx.size), "pctr_min": float(p_ctr[idx].min()),
            "pctr_max": float(p_ctr[idx].max()), "pctr_mean": float(p_ctr[idx].mean()),
            "ctr": float(click[idx].mean()), "ctr_pcoc": pcoc(p_ctr[idx], click[idx]),
            "ctcvr_pcoc": pcoc(p_ctcvr[idx], ctcvr[idx]),
        })
    return rows


def gauc(user: np.ndarray, y: np.ndarray, score: np.ndarray) -> tuple[float, int]:
    """Impression-weighted mean of per-user AUC over users with both classes; (gauc, n_users).

    Per-user AUC is the Mann-Whitney statistic from average ranks within each user (ties count
    1/2, the same value roc_auc_score gives), vectorised with pandas: one sklearn call per user
    would be millions of Python calls on real data. Rows with ``user < 0`` (null keys) are left out.
    """
    df = pd.DataFrame({"u": user, "y": y, "s": score})
    df = df[df["u"] >= 0]
    stats = df.groupby("u")["y"].agg(["size", "sum"])
    both = stats[(stats["sum"] > 0) & (stats["sum"] < stats["size"])]
    if both.empty:
        return math.nan, 0
    df = df[df["u"].isin(both.index)].copy()
    df["r"] = df.groupby("u")["s"].rank(method="average")
    pos_rank = df[df["y"] == 1].groupby("u")["r"].sum().reindex(both.index)
    n_pos, n_neg = both["sum"], both["size"] - both["sum"]
    user_auc = (pos_rank - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float((user_auc * both["size"]).sum() / both["size"].sum()), int(len(both))


def truth_metrics(truth: Mapping[str, np.ndarray], p_cvr: np.ndarray, k: int, notes: list[str]) -> dict:
    """Metrics against the simulator's truth (``potential_conversion``, ``p_cvr_true``) on D."""
    n, out = p_cvr.size, {}
    if "potential_conversion" in truth:
        potential = _labels(truth, "potential_conversion", n, "truth")
        out["cvr_auc_true_all"] = auc(potential, p_cvr, "cvr_auc_true_all", notes)
    if "p_cvr_true" in truth:
        true = _probs(truth, "p_cvr_true", n, "truth")
        out["cvr_true_mae"] = float(np.abs(p_cvr - true).mean()) if n else math.nan
        out["cvr_true_pcoc"] = pcoc(p_cvr, true, "cvr_true_pcoc", notes)
        out["cvr_true_reliability"] = [
            {"bucket": b, "n": int(idx.size), "pred_mean": float(p_cvr[idx].mean()),
             "true_mean": float(true[idx].mean())} for b, idx in enumerate(equal_count_buckets(p_cvr, k))]
    if not out:
        notes.append("truth given without 'potential_conversion' or 'p_cvr_true': no truth metrics")
    return out


def compute_metrics(pred: Mapping[str, np.ndarray], *, cvr_key: str = "p_cvr", ctcvr_key: str = "p_ctcvr",
                    truth: Mapping[str, np.ndarray] | None = None, pctr_buckets: int = 10) -> dict:
    """All evaluation metrics of one model's predictions (see :data:`METRIC_SPACES`).

    Args:
        pred: ``click``, ``conversion``, ``p_ctr``, ``p_cvr``, ``p_ctcvr`` (and ``cvr_key`` /
            ``ctcvr_key`` if different), optional ``user_key`` (GAUC; negative = unknown user).
        cvr_key / ctcvr_key: the CVR and CTCVR score entries (a model's ``cvr_output``).
        truth: optional ``p_cvr_true`` / ``potential_conversion``, row-aligned with ``pred``.
        pctr_buckets: number of quantile buckets (also used for the truth reliability table).

    Returns:
        metric name -> float (NaN where undefined), the bucket tables as lists of dicts, counts,
        the score keys used, and ``notes`` explaining every NaN.

    Raises:
        KeyError: a required key is missing. ValueError: lengths differ, labels are not 0/1,
            a conversion without a click, or predictions outside [0, 1] / not finite.
    """
    click = _labels(pred, "click", None, "pred")
    n = click.size
    conv = _labels(pred, "conversion", n, "pred")
    if (conv > click).any():
        raise ValueError(f"pred: {int((conv > click).sum())} rows have conversion=1 with click=0")
    p_ctr, p_cvr, p_ctcvr = (_probs(pred, k, n, "pred") for k in ("p_ctr", cvr_key, ctcvr_key))
    ctcvr, clicked, notes = click * conv, click == 1, []
    m: dict = {"cvr_score": cvr_key, "ctcvr_score": ctcvr_key, "n_impressions": int(n),
               "n_clicks": int(clicked.sum()), "n_conversions": int(ctcvr.sum())}
    m["ctr_auc"] = auc(click, p_ctr, "ctr_auc", notes)
    m["cvr_auc_clicked"] = auc(conv[clicked], p_cvr[clicked], "cvr_auc_clicked", notes)
    m["cvr_auc_all"] = auc(conv, p_cvr, "cvr_auc_all", notes)
    m["ctcvr_auc"] = auc(ctcvr, p_ctcvr, "ctcvr_auc", notes)
    m["logloss_ctr"] = logloss(click, p_ctr, "logloss_ctr", notes)
    m["logloss_cvr_clicked"] = logloss(conv[clicked], p_cvr[clicked], "logloss_cvr_clicked", notes)
    m["logloss_ctcvr"] = logloss(ctcvr, p_ctcvr, "logloss_ctcvr", notes)
    m["pcoc_ctr"] = pcoc(p_ctr, click, "pcoc_ctr", notes)
    m["pcoc_cvr_clicked"] = pcoc(p_cvr[clicked], conv[clicked], "pcoc_cvr_clicked", notes)
    m["pcoc_ctcvr"] = pcoc(p_ctcvr, ctcvr, "pcoc_ctcvr", notes)
    m["pcoc_by_pctr_bucket"] = pcoc_by_pctr_bucket(click, ctcvr, p_ctr, p_ctcvr, pctr_buckets)
    if "user_key" in pred:
        m["gauc_ctr"], m["gauc_users"] = gauc(_user_keys(pred, n), click, p_ctr)
        if m["gauc_users"] == 0:
            notes.append("gauc_ctr: no user has both clicked and unclicked impressions, NaN")
    else:
        m["gauc_ctr"], m["gauc_users"] = math.nan, 0
        notes.append("gauc_ctr: no 'user_key' in pred, NaN")
    if truth is not None:
        m.update(truth_metrics(truth, p_cvr, pctr_buckets, notes))
    m["notes"] = notes
    return m
