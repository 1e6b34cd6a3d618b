"""DDPO (SIGIR 2024), from the authors' code TL-UESTC/DDPO (models/ddpo_ccp.py, main.py::train;
MODELS.md §8)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from cvr_spark import losses as L
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig
from cvr_spark.models.escm2 import check_positive, check_towers, prob, tower
from cvr_spark.models.layers import TokenAttention
from cvr_spark.models.registry import register


@dataclass
class DDPOConfig(ModelConfig):
    """DDPO options; defaults are the authors' Ali-CCP settings.

    Bottoms (128, 64) and towers (64, 32), each Linear -> BatchNorm -> ReLU -> Dropout(0.2);
    embedding 5, batch 2048, Adam 1e-3, weight decay 1e-6. Loss weights are the code's
    ``parao`` (ctr), ``paract`` (ctcvr), ``parar`` (debias: L_O + L_N) and ``parac`` (conv).
    ``reduction='mean'`` reproduces the code as written (the self-normalised L_O / L_N are then
    averaged over the batch, i.e. scaled by ≈1/B); ``'sum'`` sums them instead (MODELS.md §8 [I]).
    """

    tower_dims: list[int] = field(default_factory=lambda: [64, 32])
    dropout: list[float] = field(default_factory=lambda: [0.2, 0.2])
    bottom_dims: list[int] = field(default_factory=lambda: [128, 64])
    bottom_dropout: float = 0.2
    batch_norm: bool = True
    batch_size: int = 2048
    ctr_weight: float = 1.0  # parao
    ctcvr_weight: float = 1.0  # paract
    debias_weight: float = 1.0  # parar
    conv_weight: float = 1.0  # parac
    reduction: str = "mean"
    propensity_floor: float = 1e-6

    def __post_init__(self) -> None:
        check_towers(self)
        check_positive(propensity_floor=self.propensity_floor)
        if not self.bottom_dims:
            raise ValueError("bottom_dims: expected at least one layer width")
        if self.reduction not in L.REDUCTIONS:
            raise ValueError(f"reduction must be one of {L.REDUCTIONS}, got {self.reduction!r}")


def _info(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear + ReLU: the code's ``ctr_info`` / ``ctcvr_info`` / ``cvr_info`` blocks."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())


@register("ddpo")
class DDPO(CVRModel):
    """Three separate bottoms and towers: p_ctr (click), p_cvr (post-click CVR) and q
    (``p_conv``, a naive click-space conversion model used as the soft label).

    CVR bottom enhancement (two causal transfer modules): a_1 = Attn([ReLU(W_1 h_ctr), h_cvr]),
    a_2 = Attn([ReLU(W_2 h_q), h_cvr]), h_cvr <- ReLU(W_3 [a_1 ⊕ a_2]); Attn is the 2-token
    attention with biased Q/K/V and PyTorch's default init.

    Loss (main.py::train): L_ctr (D) + L_ctcvr (D, on p_ctr p_cvr) + (L_O + L_N) + L_conv, with
    L_O on clicks against min(r + sg(q), 1) and L_N on non-clicks against sg(q), each with
    detached self-normalised inverse-propensity weights (see ``cvr_spark.losses``).
    Outputs: CVR = p_cvr, CTCVR = p_ctr * p_cvr (evaluated as the code: CVR on clicks).
    """

    paper = "DDPO (SIGIR 2024), authors' code TL-UESTC/DDPO"
    config_cls = DDPOConfig
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr", "p_conv")

    def __init__(self, spec: FeatureSpec, cfg: DDPOConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        in_dim, width = self.embedding.out_dim, int(cfg.bottom_dims[-1])
        self.bottoms = nn.ModuleList(
            MLP(in_dim, cfg.bottom_dims, cfg.bottom_dropout, batch_norm=cfg.batch_norm) for _ in range(3)
        )
        self.ctr_info, self.conv_info, self.cvr_info = _info(width, width), _info(width, width), _info(2 * width, width)
        self.ctr_attention = TokenAttention(width, bias=True, init_std=None)
        self.conv_attention = TokenAttention(width, bias=True, init_std=None)
        self.towers = nn.ModuleList(tower(width, cfg, cfg.batch_norm) for _ in range(3))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        x = self.embedding.flat(batch)  # [B, I]
        h_ctr, h_cvr, h_conv = (b(x) for b in self.bottoms)  # [B, H] each
        a1 = self.ctr_attention(torch.stack([self.ctr_info(h_ctr), h_cvr], 1))  # [B, 2, H] -> [B, H]
        a2 = self.conv_attention(torch.stack([self.conv_info(h_conv), h_cvr], 1))  # [B, 2, H] -> [B, H]
        h_cvr = self.cvr_info(torch.cat([a1, a2], 1))  # [B, 2H] -> [B, H]
        p_ctr, p_cvr, p_conv = (prob(t, h) for t, h in zip(self.towers, (h_ctr, h_cvr, h_conv)))  # [B] each
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr, "p_conv": p_conv}

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: DDPOConfig = self.cfg
        click, conv = batch["click"], batch["conversion"]
        p_ctr, p_cvr, q = out["p_ctr"], out["p_cvr"], out["p_conv"]
        t = {
            "ctr": L.ctr_loss_exposure(p_ctr, click),
            "ctcvr": L.ctcvr_loss_exposure(out["p_ctcvr"], click, conv),
            "conv": L.cvr_loss_click_over_exposure(q, click, conv),
            "cvr_click": L.ddpo_click_loss(p_cvr, q, p_ctr, click, conv, cfg.reduction, cfg.propensity_floor),
            "cvr_unclick": L.ddpo_unclick_loss(p_cvr, q, p_ctr, click, cfg.reduction, cfg.propensity_floor),
        }
        t["total"] = (
            cfg.ctr_weight * t["ctr"] + cfg.ctcvr_weight * t["ctcvr"] + cfg.conv_weight * t["conv"]
            + cfg.debias_weight * (t["cvr_click"] + t["cvr_unclick"])
        )
        return t
