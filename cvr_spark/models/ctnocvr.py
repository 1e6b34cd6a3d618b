"""CTnoCVR (SIGIR'22) on three backbones: ``esmm+ctnocvr``, ``mmoe+ctnocvr``, ``cgc+ctnocvr``
(MODELS.md §10).

Three towers (CTR, CVR, CTnoCVR) on one shared embedding; the CTnoCVR tower has its own
label c = o*(1-r). Loss (Eq. 6, corrected):
L = mean_D BCE(p_ctr, o) + lambda1 mean_O BCE(p_cvr, r) + lambda2 mean_D BCE(p_ctnocvr, c),
with no CTCVR loss. Ranking score s = (p_cvr + w (1 - p_ctnocvr)) / (1 + w).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from torch import Tensor, nn

from cvr_spark import losses
from cvr_spark.models.base import Batch, ModelConfig
from cvr_spark.models.esmm import MultiTaskModel, check_tower_config
from cvr_spark.models.moe import CGCOptions, MMoEOptions, cgc_backbone, mmoe_backbone
from cvr_spark.models.registry import register


@dataclass
class CTnoCVRConfig(ModelConfig):
    """CTnoCVR options; defaults are §10's (paper values where the paper gives them)."""

    embedding_dim: int = 12  # code configs/esmm_ali_cpp.yml; paper sweep {12, 18, 24}
    tower_dims: list[int] = field(default_factory=lambda: [200, 80])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.0])
    batch_size: int = 5000
    lr: float = 1e-3
    # The code's Adam "decay 1e-4" is Keras' learning-rate decay, not weight decay.
    weight_decay: float = 0.0
    ctr_weight: float = 1.0
    cvr_weight: float = 0.5  # lambda1: paper Fig. 3a best 0.5; code weights [1, 0, 10|20, 1] use 10 or 20
    ctnocvr_weight: float = 1.0  # lambda2: 1 in the code
    score_weight: float = 0.01  # w: paper best 0.01; code 0.04 (MMoE), 0.05 (CGC), 0.08 (comment)

    def __post_init__(self) -> None:
        check_tower_config(self)
        if self.score_weight < 0:
            raise ValueError(f"score_weight: expected >= 0, got {self.score_weight}")


@dataclass
class MMoECTnoCVRConfig(CTnoCVRConfig, MMoEOptions):
    """CTnoCVR + MMoE: 8 experts of one Dense(4)+ReLU layer (code values)."""

    n_experts: int = 8
    expert_dims: list[int] = field(default_factory=lambda: [4])


@dataclass
class CGCCTnoCVRConfig(CTnoCVRConfig, CGCOptions):
    """CTnoCVR + CGC: 8 shared experts, task-specific [1, 0, 3] for (CTR, CVR, CTnoCVR),
    each a single Dense(4)+ReLU (code values). ``gate_mode`` defaults to the paper's per-task
    softmax; the code uses ``masked`` (softmax over all experts, masked, not renormalised)."""

    n_shared_experts: int = 8
    n_specific_experts: list[int] = field(default_factory=lambda: [1, 0, 3])
    expert_dims: list[int] = field(default_factory=lambda: [4])


def ctnocvr_score(p_cvr: Tensor, p_ctnocvr: Tensor, w: float) -> Tensor:
    """The CTnoCVR ranking score s = (p_cvr + w (1 - p_ctnocvr)) / (1 + w), in [0, 1]. [B]"""
    return (p_cvr + w * (1.0 - p_ctnocvr)) / (1.0 + w)


class CTnoCVRModel(MultiTaskModel):
    """Three towers (CTR, CVR, CTnoCVR); ``cvr_output`` is the combined score ``p_score``.

    Outputs: p_ctr, p_cvr (the CVR tower), p_ctcvr = p_ctr * p_cvr, p_ctnocvr (own tower,
    not p_ctr (1 - p_cvr)), p_score (the ranking score the paper's CVR-AUC uses).
    """

    tasks: ClassVar[tuple[str, ...]] = ("ctr", "cvr", "ctnocvr")
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr", "p_ctnocvr", "p_score")
    cvr_output = "p_score"
    ctcvr_output = "p_ctcvr"

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = self.task_probs(batch)
        out["p_ctcvr"] = out["p_ctr"] * out["p_cvr"]
        out["p_score"] = ctnocvr_score(out["p_cvr"], out["p_ctnocvr"], self.cfg.score_weight)
        return out

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: CTnoCVRConfig = self.cfg
        click, conversion = batch["click"], batch["conversion"]
        ctr = losses.ctr_loss_exposure(out["p_ctr"], click)
        cvr = losses.cvr_loss_click(out["p_cvr"], click, conversion)
        ctnocvr = losses.ctnocvr_loss_exposure(out["p_ctnocvr"], click, conversion)
        total = cfg.ctr_weight * ctr + cfg.cvr_weight * cvr + cfg.ctnocvr_weight * ctnocvr
        return {"ctr": ctr, "cvr": cvr, "ctnocvr": ctnocvr, "total": total}


@register("esmm+ctnocvr")
class ESMMCTnoCVR(CTnoCVRModel):
    """CTnoCVR on the ESMM backbone: three MLP towers reading the shared embedding."""

    paper = "CTnoCVR (SIGIR 2022) on ESMM"
    config_cls = CTnoCVRConfig


@register("mmoe+ctnocvr")
class MMoECTnoCVR(CTnoCVRModel):
    """CTnoCVR on MMoE: three gates (CTR, CVR, CTnoCVR) over shared experts."""

    paper = "CTnoCVR (SIGIR 2022) on MMoE"
    config_cls = MMoECTnoCVRConfig

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        return mmoe_backbone(self.cfg, in_dim, n_tasks, shared_gate=False)


@register("cgc+ctnocvr")
class CGCCTnoCVR(CTnoCVRModel):
    """CTnoCVR on CGC: task-specific [1, 0, 3] + 8 shared experts, three task gates."""

    paper = "CTnoCVR (SIGIR 2022) on CGC"
    config_cls = CGCCTnoCVRConfig

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        return cgc_backbone(self.cfg, in_dim, n_tasks)
