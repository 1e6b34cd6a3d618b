"""DCMT (Zhu et al., ICDE 2023): a twin CVR tower with factual and counterfactual heads (MODELS.md §6)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from cvr_spark import losses as L
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig, head
from cvr_spark.models.escm2 import check_positive, check_towers, prob, tower
from cvr_spark.models.registry import register


@dataclass
class DCMTConfig(ModelConfig):
    """DCMT options: L = w_ctr E^CTR + w_cvr E^DCMT + w_ctcvr E^CTCVR (L2 as Adam weight decay).

    E^DCMT = twin IPW term + ``constraint_weight`` (λ_1) * mean_D |1 - (r̂ + r̂*)|. The NISE
    reimplementation uses λ_1 = 1e-3 and unclamped propensities; ours are clamped at
    ``propensity_clamp`` (o/ô and (1-o)/(1-ô) both) and optionally capped at ``weight_cap``.
    ``wide=False`` drops the wide (linear) parts of the two CVR heads.
    """

    ctr_weight: float = 1.0
    cvr_weight: float = 1.0  # w^cvr
    ctcvr_weight: float = 1.0  # w^ctcvr
    constraint_weight: float = 1e-3  # λ_1
    propensity_clamp: float = 0.01
    weight_cap: float | None = None
    wide: bool = True

    def __post_init__(self) -> None:
        check_towers(self)
        check_positive(propensity_clamp=self.propensity_clamp, weight_cap=self.weight_cap)


@register("dcmt")
class DCMT(CVRModel):
    """Direct entire-space causal multi-task model.

    A CTR tower, and a twin CVR tower: one deep trunk (MLP ``tower_dims``) with a factual and a
    counterfactual deep head, plus a factual and a counterfactual wide (linear) head on the
    flat embedding: r̂ = σ(φ_f(x) + ψ_f(h)), r̂* = σ(φ_cf(x) + ψ_cf(h)).
    Loss (MODELS.md §6): E^CTR (D) + E^DCMT (factual IPW on O, counterfactual IPW with label
    1 - r on N, over |D|, plus λ_1 |1 - (r̂ + r̂*)|) + E^CTCVR (D, on p_ctr * r̂).
    Outputs: CVR = r̂ (``p_cvr``), CTCVR = p_ctr * r̂; r̂* is ``p_cvr_cf`` (training only).
    """

    paper = "DCMT (Zhu et al., ICDE 2023)"
    config_cls = DCMTConfig
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr", "p_cvr_cf")

    def __init__(self, spec: FeatureSpec, cfg: DCMTConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        in_dim = self.embedding.out_dim
        self.ctr_tower = tower(in_dim, cfg)
        self.cvr_trunk = MLP(in_dim, cfg.tower_dims, cfg.dropout)
        width = self.cvr_trunk.out_dim
        self.deep_f, self.deep_cf = head(width), head(width)
        self.wide_f = nn.Linear(in_dim, 1) if cfg.wide else None
        self.wide_cf = nn.Linear(in_dim, 1) if cfg.wide else None

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, I]
        h = self.cvr_trunk(x)  # [B, H]
        logit_f, logit_cf = self.deep_f(h), self.deep_cf(h)  # [B, 1] each
        if self.wide_f is not None:
            logit_f, logit_cf = logit_f + self.wide_f(x), logit_cf + self.wide_cf(x)
        p_ctr = prob(self.ctr_tower, x)  # [B]
        p_cvr, p_cvr_cf = torch.sigmoid(logit_f).squeeze(-1), torch.sigmoid(logit_cf).squeeze(-1)  # [B]
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr, "p_cvr_cf": p_cvr_cf}

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: DCMTConfig = self.cfg
        click, conv = batch["click"], batch["conversion"]
        t = {
            "ctr": L.ctr_loss_exposure(out["p_ctr"], click),
            "cvr_twin_ipw": L.dcmt_twin_ipw_loss_exposure(
                out["p_cvr"], out["p_cvr_cf"], out["p_ctr"], click, conv, cfg.propensity_clamp, cfg.weight_cap
            ),
            "cvr_twin_constraint": L.twin_constraint_loss_exposure(out["p_cvr"], out["p_cvr_cf"]),
            "ctcvr": L.ctcvr_loss_exposure(out["p_ctcvr"], click, conv),
        }
        dcmt = t["cvr_twin_ipw"] + cfg.constraint_weight * t["cvr_twin_constraint"]
        t["total"] = cfg.ctr_weight * t["ctr"] + cfg.cvr_weight * dcmt + cfg.ctcvr_weight * t["ctcvr"]
        return t
