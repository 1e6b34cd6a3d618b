"""Two-tower baselines on one shared embedding: ``mlp`` (naive) and ``esmm`` (MODELS.md §3).

:class:`MultiTaskModel` is the shared skeleton of this family and of the MoE and CTnoCVR
models: embedding -> backbone (one representation per task) -> one tower + head per task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from cvr_spark import losses
from cvr_spark.models.base import Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig
from cvr_spark.models.layers import SharedInput, TaskTowers
from cvr_spark.models.registry import register


def check_tower_config(cfg: ModelConfig) -> None:
    """Raise a ValueError naming the keys when ``tower_dims`` and ``dropout`` disagree."""
    if not cfg.tower_dims:
        raise ValueError("tower_dims: expected at least one layer width")
    if len(cfg.dropout) != len(cfg.tower_dims):
        raise ValueError(
            f"dropout has {len(cfg.dropout)} rates but tower_dims has {len(cfg.tower_dims)} layers; expected one rate per layer"
        )


@dataclass
class MLPConfig(ModelConfig):
    """``mlp``: loss = ctr_weight * L_ctr(D) + cvr_weight * L_cvr(O)."""

    ctr_weight: float = 1.0
    cvr_weight: float = 1.0

    def __post_init__(self) -> None:
        check_tower_config(self)


@dataclass
class ESMMConfig(ModelConfig):
    """``esmm`` and its MoE variants: loss = ctr_weight * L_ctr(D) + ctcvr_weight * L_ctcvr(D)."""

    ctr_weight: float = 1.0
    ctcvr_weight: float = 1.0

    def __post_init__(self) -> None:
        check_tower_config(self)


class MultiTaskModel(CVRModel):
    """Shared embedding -> backbone -> one tower per task in ``tasks`` (probabilities ``p_<task>``).

    Subclasses choose the backbone by overriding :meth:`build_backbone` (default: every tower
    reads the flat embedding, as in ESMM).
    """

    tasks: ClassVar[tuple[str, ...]] = ("ctr", "cvr")

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        self.backbone = self.build_backbone(self.embedding.out_dim, len(self.tasks))
        self.towers = TaskTowers(self.backbone.out_dims, cfg.tower_dims, cfg.dropout)

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        """A module mapping x [B, in_dim] to ``n_tasks`` tensors, with ``out_dims``."""
        return SharedInput(in_dim, n_tasks)

    def task_probs(self, batch: Batch) -> dict[str, Tensor]:
        """``{'p_<task>': [B]}`` for every task."""
        x = self.embedding.flat(batch)  # [B, (F+M)*D + Z]
        logits = self.towers(self.backbone(x))  # [B, K]
        probs = torch.sigmoid(logits)
        return {f"p_{t}": probs[:, k] for k, t in enumerate(self.tasks)}


class CtrCvrModel(MultiTaskModel):
    """Two towers (CTR, CVR) with p_ctcvr = p_ctr * p_cvr; the loss is set by subclasses."""

    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr")

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = self.task_probs(batch)
        out["p_ctcvr"] = out["p_ctr"] * out["p_cvr"]
        return out


@register("mlp")
class NaiveMLP(CtrCvrModel):
    """Two independent MLP towers on the shared embedding (CSTWA's "MLP" baseline).

    The CTR tower is trained on D (BCE on click), the CVR tower on O only (BCE on conversion
    over clicked rows), so the CVR tower suffers the sample-selection bias ESMM fixes.
    p_ctcvr = p_ctr * p_cvr.
    """

    paper = "naive two-tower baseline (CSTWA Table 2 'MLP')"
    config_cls = MLPConfig

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: MLPConfig = self.cfg
        ctr = losses.ctr_loss_exposure(out["p_ctr"], batch["click"])
        cvr = losses.cvr_loss_click(out["p_cvr"], batch["click"], batch["conversion"])
        return {"ctr": ctr, "cvr": cvr, "total": cfg.ctr_weight * ctr + cfg.cvr_weight * cvr}


class ESMMLoss:
    """Mixin: the ESMM loss L = w_ctr mean_D BCE(p_ctr, o) + w_ctcvr mean_D BCE(p_ctr p_cvr, o r)."""

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: ESMMConfig = self.cfg
        ctr = losses.ctr_loss_exposure(out["p_ctr"], batch["click"])
        ctcvr = losses.ctcvr_loss_exposure(out["p_ctcvr"], batch["click"], batch["conversion"])
        return {"ctr": ctr, "ctcvr": ctcvr, "total": cfg.ctr_weight * ctr + cfg.ctcvr_weight * ctcvr}


@register("esmm")
class ESMM(ESMMLoss, CtrCvrModel):
    """ESMM (SIGIR'18): CTR and CVR towers on one embedding, trained over the entire space.

    L = mean_D BCE(p_ctr, o) + mean_D BCE(p_ctr * p_cvr, o*r); no direct CVR loss, and the
    CTCVR term trains both towers. Outputs: CVR = p_cvr, CTCVR = p_ctr * p_cvr.

    Also stands for ESM² (SIGIR'20) on Ali-CCP: without a D-action label ESM² reduces to ESMM
    (MODELS.md §3 [I]), which is how CSTWA reports "ESMM [12, 25]" as one row.
    """

    paper = "ESMM (Ma et al., SIGIR 2018); ESM2 on Ali-CCP (Wen et al., SIGIR 2020)"
    config_cls = ESMMConfig
