"""NISE (RecSys 2024; "UCVRLC" in the authors' code): entire-space CVR with entropy
minimisation on unclicked exposures and a dynamic loss weight (MODELS.md §8)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import Tensor

from cvr_spark import losses as L
from cvr_spark.models.base import Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig
from cvr_spark.models.escm2 import check_positive, check_towers, prob, tower
from cvr_spark.models.registry import register


@dataclass
class NISEConfig(ModelConfig):
    """NISE options (defaults: the authors' ``adaptive_ucvrlc`` strategy).

    L = L_ctr + β_t (L_O + entropy_weight L_N), β_t = α min(L_ctr / (L_O + L_N), β) from the
    batch's values (no gradient through β_t). ``dynamic_weight=False`` uses β_t = α β fixed
    (the code's ``naive`` strategy); ``entropy_weight=0`` drops L_N (its ``ablation_3``).
    """

    embedding_dim: int = 16
    tower_dims: list[int] = field(default_factory=lambda: [160, 80])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [I]: the script's rate is not recorded
    batch_norm: bool = True  # torch-rechub's MLP: Linear -> BatchNorm1d -> ReLU -> Dropout
    batch_size: int = 2048
    weight_decay: float = 1e-5
    alpha: float = 1.0  # α (`ablation_weight`)
    beta_max: float = 50.0  # β (`weight`)
    dynamic_weight: bool = True
    entropy_weight: float = 1.0

    def __post_init__(self) -> None:
        check_towers(self)
        check_positive(alpha=self.alpha, beta_max=self.beta_max)
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight: expected >= 0, got {self.entropy_weight}")


@register("nise")
class NISE(CVRModel):
    """Separate CTR and CVR towers on the concatenated embeddings.

    L_O = (1/|D|) sum_O BCE(p_cvr, r); L_N = (1/|D|) sum_N BCE(p_cvr, p_cvr) with the target
    *not* detached (entropy minimisation on N). L_ctcvr is computed for logging only.
    The CVR tower is trained on the entire space: CVR = p_cvr, CTCVR = p_ctr * p_cvr.
    """

    paper = "NISE (RecSys 2024), authors' code Hjh233/NISE (strategy adaptive_ucvrlc)"
    config_cls = NISEConfig
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, spec: FeatureSpec, cfg: NISEConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        self.ctr_tower = tower(self.embedding.out_dim, cfg, cfg.batch_norm)
        self.cvr_tower = tower(self.embedding.out_dim, cfg, cfg.batch_norm)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, I]
        p_ctr, p_cvr = prob(self.ctr_tower, x), prob(self.cvr_tower, x)  # [B] each
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr}

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: NISEConfig = self.cfg
        click, conv = batch["click"], batch["conversion"]
        t = {
            "ctr": L.ctr_loss_exposure(out["p_ctr"], click),
            "cvr_click": L.cvr_loss_click_over_exposure(out["p_cvr"], click, conv),
            "cvr_unclick_entropy": L.entropy_loss_unclick_over_exposure(out["p_cvr"], click),
        }
        cvr = t["cvr_click"] + cfg.entropy_weight * t["cvr_unclick_entropy"]
        if cfg.dynamic_weight:
            beta = L.nise_dynamic_weight(t["ctr"], cvr, cfg.alpha, cfg.beta_max)
        else:
            beta = cfg.alpha * cfg.beta_max
        with torch.no_grad():
            t["ctcvr"] = L.ctcvr_loss_exposure(out["p_ctcvr"], click, conv)
        t["beta_t"] = torch.tensor(beta, dtype=cvr.dtype, device=cvr.device)
        t["total"] = t["ctr"] + beta * cvr
        return t
