"""``ctr``: the click-only model CSTWA pre-trains for its latent structure (MODELS.md §9.3).

Input -> one embedding table E^pre (all fields) -> concatenation -> Click Tower (MLP with
ReLU + dropout) -> Click Layer (Linear + sigmoid), trained with mean_D BCE(ŷ_ctr, o) on every
impression. Only E^pre is used afterwards (the graph job, :mod:`cvr_spark.graph`).

**Outputs.** ``p_ctr`` is the model's only meaningful score. The interface requires ``p_cvr``
and ``p_ctcvr``; both are copies of ``p_ctr`` and are **not meaningful** (no conversion signal
enters the model): train it with ``early_stop_metric=ctr_auc`` (the graph job does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

from torch import Tensor

from cvr_spark import losses
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig, head
from cvr_spark.models.esmm import check_tower_config
from cvr_spark.models.registry import register


@dataclass
class CTRConfig(ModelConfig):
    """``ctr``: the shared options only (embedding, tower, dropout, Adam lr / weight decay)."""

    def __post_init__(self) -> None:
        check_tower_config(self)


@register("ctr")
class CTRModel(CVRModel):
    """Click-only model: ``embedding`` (EmbeddingArch, the table the graph job exports) ->
    ``click_tower`` -> ``click_head``. ``p_cvr`` / ``p_ctcvr`` repeat ``p_ctr`` (not meaningful)."""

    paper = "CSTWA stage 0 CTR pre-training (arXiv 2304.01169, §9.3); click-only, no CVR score"
    config_cls = CTRConfig
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, spec: FeatureSpec, cfg: CTRConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        self.click_tower = MLP(self.embedding.out_dim, cfg.tower_dims, cfg.dropout)
        self.click_head = head(self.click_tower.out_dim)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, (F+M)*D + Z]
        p_ctr = self.click_head(self.click_tower(x)).squeeze(-1).sigmoid()  # [B]
        return {"p_ctr": p_ctr, "p_cvr": p_ctr, "p_ctcvr": p_ctr}

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        ctr = losses.ctr_loss_exposure(out["p_ctr"], batch["click"])
        return {"ctr": ctr, "total": ctr}
