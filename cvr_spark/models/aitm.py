"""AITM (Xi et al., KDD 2021) in the form of its official code (MODELS.md §4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from cvr_spark import losses
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig, head
from cvr_spark.models.esmm import check_tower_config
from cvr_spark.models.layers import TokenAttention
from cvr_spark.models.registry import register


@dataclass
class AITMConfig(ModelConfig):
    """AITM options. Defaults are the official code's (embedding 5, towers 128-64-32,
    keep_prob 0.9/0.7/0.7, Adam 1e-3, batch 2000, lamda 1e-6, weight 0.6)."""

    calibrator_weight: float = 0.6  # `--weight`: label-constraint weight w
    # `--lamda`: lambda * sum ||.||^2 / 2 on the embedding table and the Q/K/V matrices,
    # added to the loss as the code does (tf l2_regularizer); hence no Adam weight decay.
    l2_reg: float = 1e-6
    weight_decay: float = 0.0
    # The L2 term's gradient reaches every row of the table in every step, so row-wise (lazy)
    # Adam would run a dense step anyway: dense Adam (the official code's TF Adam) by default.
    embedding_optimizer: str = "adam"
    attention_init_std: float = 0.01  # Q/K/V ~ N(0, 0.01^2), no bias

    def __post_init__(self) -> None:
        check_tower_config(self)
        if self.l2_reg < 0 or self.calibrator_weight < 0:
            raise ValueError(f"l2_reg / calibrator_weight: expected >= 0, got {self.l2_reg} / {self.calibrator_weight}")


@register("aitm")
class AITM(CVRModel):
    """Adaptive Information Transfer Multi-task model (click -> purchase), official code form.

    Click tower q_1 and purchase tower q_2 (MLP ``tower_dims``) on the shared embedding;
    info layer p_1 = Dropout(ReLU(Dense(q_1))); z_2 = attention over the two tokens [q_2, p_1]
    (H x H Q/K/V, no bias, N(0, 0.01^2)); p_ctr = sigmoid(Dense(q_1)), purchase head
    sigmoid(Dense(z_2)).

    **Outputs.** The purchase head is trained on D against the impression-level buy label, so
    it estimates P(click & buy): it is ``p_ctcvr`` (``ctcvr_output``). ``p_cvr`` is the derived
    post-click score clamp(p_ctcvr / p_ctr, 0, 1) (``cvr_output``); no loss uses it, and
    p_ctcvr == p_ctr * p_cvr holds only where the ratio is not clamped.

    **Loss.** L = mean_D BCE(p_ctr, o) + mean_D BCE(p_ctcvr, o*r)
    + w mean_D max(p_ctcvr - p_ctr, 0) + lambda (||E||^2 + ||W_Q,K,V||^2) / 2, w = 0.6,
    no stop-gradient on the constraint. The code's purchase label is r; o*r == r because the
    batch contract has no conversion without a click.
    """

    paper = "AITM (Xi et al., KDD 2021), official code xidongbo/AITM"
    config_cls = AITMConfig
    cvr_output = "p_cvr"
    ctcvr_output = "p_ctcvr"
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, spec: FeatureSpec, cfg: AITMConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        width = int(cfg.tower_dims[-1])
        self.click_tower = MLP(self.embedding.out_dim, cfg.tower_dims, cfg.dropout)
        self.buy_tower = MLP(self.embedding.out_dim, cfg.tower_dims, cfg.dropout)
        # Info layer: Dense(width) + ReLU + Dropout at the last tower rate (the code's keep_prob[2]).
        self.info = MLP(width, [width], cfg.dropout[-1])
        self.attention = TokenAttention(width, bias=False, init_std=cfg.attention_init_std)
        self.click_head, self.buy_head = head(width), head(width)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, (F+M)*D + Z]
        q1, q2 = self.click_tower(x), self.buy_tower(x)  # [B, H] each
        p1 = self.info(q1)  # [B, H]
        z2 = self.attention(torch.stack([q2, p1], 1))  # [B, 2, H] -> [B, H]
        p_ctr = torch.sigmoid(self.click_head(q1)).squeeze(-1)  # [B]
        p_ctcvr = torch.sigmoid(self.buy_head(z2)).squeeze(-1)  # [B]
        p_cvr = (p_ctcvr / p_ctr.clamp_min(losses.EPS)).clamp(0.0, 1.0)
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctcvr}

    def regularised_parameters(self) -> list[nn.Parameter]:
        """What the code puts under L2: the embedding table and the attention Q/K/V."""
        return [self.embedding.table.weight, *self.attention.projection_weights()]

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: AITMConfig = self.cfg
        ctr = losses.ctr_loss_exposure(out["p_ctr"], batch["click"])
        ctcvr = losses.ctcvr_loss_exposure(out["p_ctcvr"], batch["click"], batch["conversion"])
        calibrator = losses.calibrator_loss_exposure(out["p_ctr"], out["p_ctcvr"])
        l2 = losses.l2_penalty(self.regularised_parameters())
        total = ctr + ctcvr + cfg.calibrator_weight * calibrator + cfg.l2_reg * l2
        return {"ctr": ctr, "ctcvr": ctcvr, "calibrator": calibrator, "l2": l2, "total": total}
