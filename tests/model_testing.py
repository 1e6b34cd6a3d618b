"""Reusable helpers for model tests: a tiny FeatureSpec, learnable synthetic batches, a short
overfit loop returning training AUCs, and a check that gradients reach every parameter.

Labels of :func:`make_batch` (``signal=True``) depend on fields ``f0`` and ``f1`` (click) and
``f2`` (conversion), plus the first multi-valued field and dense feature when present.
Conversions only happen on clicks.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from cvr_spark.models.base import Batch, CVRModel, FeatureSpec

CLICK_RATE = 0.3
CONVERSION_RATE = 0.3  # of clicks


def make_spec(
    n_sparse: int = 4,
    vocab: int = 12,
    n_multi: int = 0,
    multi_vocab: int = 9,
    n_dense: int = 0,
) -> FeatureSpec:
    """A small FeatureSpec: ``n_sparse`` single-valued fields (f0 is the user key, f1 the item
    key), ``n_multi`` multi-valued fields (m0, ...) and ``n_dense`` dense features (d0, ...)."""
    if n_sparse < 3:
        raise ValueError(f"n_sparse: the labels use fields f0..f2, got n_sparse={n_sparse}")
    sparse = tuple(f"f{i}" for i in range(n_sparse))
    multi = tuple(f"m{i}" for i in range(n_multi))
    groups = {"f0": "user", "f1": "item", **{m: "user" for m in multi}}
    return FeatureSpec(
        sparse_fields=sparse,
        sparse_vocab=(vocab,) * n_sparse,
        multi_fields=multi,
        multi_vocab=(multi_vocab,) * n_multi,
        dense_fields=tuple(f"d{i}" for i in range(n_dense)),
        groups=groups,
        user_key_field="f0",
        item_key_field="f1",
    )


def _threshold(score: np.ndarray, rate: float) -> np.ndarray:
    """1 for the top ``rate`` share of ``score`` (0/1 float array)."""
    if score.size == 0:
        return score.astype(np.float32)
    return (score > np.quantile(score, 1.0 - rate)).astype(np.float32)


def make_batch(
    spec: FeatureSpec, n: int, seed: int = 0, signal: bool = True, max_len: int = 4, label_seed: int = 1234
) -> dict[str, Tensor]:
    """A dict batch for ``spec`` with ~30% clicks and ~30% of clicks converting.

    With ``signal`` the labels are thresholds of noisy per-index effects of f0, f1 (click)
    and f2 (conversion), so a model can learn them; without it they are random.
    """
    rng = np.random.default_rng(seed)
    sparse = np.stack([rng.integers(0, v, n) for v in spec.sparse_vocab], 1)  # [B, F]
    batch: dict[str, Tensor] = {"sparse": torch.from_numpy(sparse).long()}
    click_score, conv_score = rng.normal(0.0, 0.3, n), rng.normal(0.0, 0.3, n)
    if spec.multi_fields:
        m = len(spec.multi_fields)
        multi = np.stack([rng.integers(0, v, (n, max_len)) for v in spec.multi_vocab], 1)  # [B, M, L]
        lens = rng.integers(1, max_len + 1, (n, m))  # [B, M]
        batch["multi"], batch["multi_len"] = torch.from_numpy(multi).long(), torch.from_numpy(lens).long()
        click_score += 0.5 * (multi[:, 0, 0] % 2)
    if spec.dense_fields:
        dense = rng.normal(size=(n, len(spec.dense_fields))).astype(np.float32)  # [B, Z]
        batch["dense"] = torch.from_numpy(dense)
        conv_score += 0.5 * dense[:, 0]
    effects = np.random.default_rng(label_seed).normal(0.0, 1.0, (3, max(spec.sparse_vocab)))
    click_score += effects[0, sparse[:, 0]] + effects[1, sparse[:, 1]]
    conv_score += effects[2, sparse[:, 2]]
    if not signal:
        click_score, conv_score = rng.random(n), rng.random(n)
    click = _threshold(click_score, CLICK_RATE)
    conversion = np.zeros(n, dtype=np.float32)
    clicked = click == 1
    conversion[clicked] = _threshold(conv_score[clicked], CONVERSION_RATE)
    batch["click"], batch["conversion"] = torch.from_numpy(click), torch.from_numpy(conversion)
    batch["user_key"], batch["item_key"] = batch["sparse"][:, 0].clone(), batch["sparse"][:, 1].clone()
    return batch


def train_auc(
    model: CVRModel, batch: Batch, steps: int, lr: float = 0.01, eval_batch: Batch | None = None
) -> tuple[float, float]:
    """Train with Adam on the fixed ``batch`` for ``steps`` steps; return the AUCs of click vs
    p_ctr and conversion vs the model's ``ctcvr_output``, in eval mode, on ``batch`` (training
    AUC) or on ``eval_batch`` when given (held-out AUC)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model.loss(batch, model(batch))["total"].backward()
        opt.step()
    model.eval()
    target = batch if eval_batch is None else eval_batch
    with torch.no_grad():
        out = model(target)
    ctr = roc_auc_score(target["click"].numpy(), out["p_ctr"].numpy())
    ctcvr = roc_auc_score(target["conversion"].numpy(), out[model.ctcvr_output].numpy())
    return float(ctr), float(ctcvr)


def params_without_grad(model: CVRModel, batch: Batch) -> list[str]:
    """Names of trainable parameters whose gradient is missing or all zero after one backward
    of ``loss(...)['total']`` on ``batch`` (train mode)."""
    model.train()
    model.zero_grad(set_to_none=True)
    model.loss(batch, model(batch))["total"].backward()
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(torch.any(p.grad != 0)))
    ]


def params_outside_graph(model: CVRModel) -> list[str]:
    """Names of trainable parameters the last backward gave no gradient at all (None; a zero
    gradient is fine). DDP runs with ``find_unused_parameters=False`` (TrainConfig), so every
    trainable parameter must be in the graph of every step."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def bfloat16_loss(model: CVRModel, batch: Batch) -> dict[str, Tensor]:
    """The loss terms of the loop's training forward with ``train.amp=true`` on CPU: the forward
    under bfloat16 autocast, its outputs cast back to float32 for the losses
    (``cvr_spark.train.loop.float32_outputs``). Not yet backpropagated."""
    from cvr_spark.train.loop import float32_outputs

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    return model.loss(batch, float32_outputs(out))
