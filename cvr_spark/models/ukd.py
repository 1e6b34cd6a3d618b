"""UKD (Xu et al., WWW 2022): uncertainty-regularised knowledge distillation for CVR (MODELS.md §7).

**Low-confidence reconstruction.** No code was found and the paper is known only from a
secondary summary ([P~]); every choice below marked [I] is ours and is an option.

- **Teacher ("click-adaptive").** A feature extractor (MLP ``tower_dims``) on the flat
  embedding feeds (a) a CVR head trained on O with BCE(., r), and (b) a click discriminator
  trained on D with BCE(., o) behind a gradient-reversal layer (GRL, scale ``grl_lambda``),
  so the extractor learns a click-invariant representation. The teacher's CVR on every row,
  detached, is the soft pseudo-label ỹ; the student uses it on N.
  [I] Teacher and student are trained *jointly* in one loss (the paper trains the teacher
  first), and by default the teacher reads a *detached* embedding (``teacher_detach_embedding``)
  so that its adversarial gradient does not fight the student's CTR loss in the one shared
  embedding table.
- **Student (ESMM-style).** A CTR tower and two CVR towers a, b (separate MLPs [I]);
  p_cvr = (p_a + p_b) / 2 and p_ctcvr = p_ctr p_cvr. Loss: L_ctr (D) + L_ctcvr (D)
  + (BCE(p_a, r) + BCE(p_b, r)) / 2 on O + mean_N[exp(-u) KD + u] with
  KD = (BCE(p_a, ỹ) + BCE(p_b, ỹ)) / 2 and u the symmetric Bernoulli KL between the heads [I].
- **Inference.** CVR = the student's p_cvr; CTCVR = p_ctr p_cvr.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from cvr_spark import losses as L
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig, head
from cvr_spark.models.escm2 import check_towers, prob, tower
from cvr_spark.models.registry import register


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by -scale backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    """Gradient-reversal layer: returns ``x``; its gradient is multiplied by ``-scale``."""
    return _ReverseGrad.apply(x, scale)


@dataclass
class UKDConfig(ModelConfig):
    """UKD options (all [I] beyond the loss structure; see the module docstring)."""

    ctr_weight: float = 1.0
    ctcvr_weight: float = 1.0
    cvr_weight: float = 1.0  # student's two heads on O
    distill_weight: float = 1.0  # uncertainty-regularised distillation on N
    teacher_weight: float = 1.0  # teacher CVR (O) + discriminator (D)
    discriminator_weight: float = 1.0
    grl_lambda: float = 1.0
    discriminator_dims: list[int] = field(default_factory=lambda: [32])
    teacher_detach_embedding: bool = True
    detach_uncertainty: bool = False

    def __post_init__(self) -> None:
        check_towers(self)
        if self.grl_lambda < 0:
            raise ValueError(f"grl_lambda: expected >= 0, got {self.grl_lambda}")
        if not self.discriminator_dims:
            raise ValueError("discriminator_dims: expected at least one layer width")


@register("ukd")
class UKD(CVRModel):
    """Click-adaptive teacher (GRL click discriminator) + two-head student with uncertainty-weighted
    distillation on unclicked exposures. See the module docstring for the reconstruction."""

    paper = "UKD (Xu et al., WWW 2022), paper-level reconstruction (low confidence)"
    config_cls = UKDConfig
    outputs: ClassVar[tuple[str, ...]] = (
        "p_ctr", "p_cvr", "p_ctcvr", "p_cvr_a", "p_cvr_b", "p_teacher_cvr", "p_click_disc", "soft_label",
    )

    def __init__(self, spec: FeatureSpec, cfg: UKDConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        in_dim = self.embedding.out_dim
        self.teacher_extractor = MLP(in_dim, cfg.tower_dims, cfg.dropout)
        width = self.teacher_extractor.out_dim
        self.teacher_cvr = head(width)
        self.discriminator = MLP(width, cfg.discriminator_dims, out_dim=1)
        self.ctr_tower, self.cvr_tower_a, self.cvr_tower_b = (tower(in_dim, cfg) for _ in range(3))

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        cfg: UKDConfig = self.cfg
        x = self.embedding.flat(batch)  # [B, I]
        h_t = self.teacher_extractor(x.detach() if cfg.teacher_detach_embedding else x)  # [B, H]
        p_teacher = prob(self.teacher_cvr, h_t)  # [B]
        p_disc = prob(self.discriminator, reverse_gradient(h_t, cfg.grl_lambda))  # [B]
        p_ctr, p_a, p_b = prob(self.ctr_tower, x), prob(self.cvr_tower_a, x), prob(self.cvr_tower_b, x)
        p_cvr = 0.5 * (p_a + p_b)
        return {
            "p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr, "p_cvr_a": p_a, "p_cvr_b": p_b,
            "p_teacher_cvr": p_teacher, "p_click_disc": p_disc, "soft_label": p_teacher.detach(),
        }

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: UKDConfig = self.cfg
        click, conv = batch["click"], batch["conversion"]
        p_a, p_b = out["p_cvr_a"], out["p_cvr_b"]
        t = {
            "ctr": L.ctr_loss_exposure(out["p_ctr"], click),
            "ctcvr": L.ctcvr_loss_exposure(out["p_ctcvr"], click, conv),
            "cvr_click": 0.5 * (L.cvr_loss_click(p_a, click, conv) + L.cvr_loss_click(p_b, click, conv)),
            "distill_unclick": L.uncertainty_distill_loss_unclick(
                p_a, p_b, out["soft_label"], click, cfg.detach_uncertainty
            ),
            "teacher_cvr": L.cvr_loss_click(out["p_teacher_cvr"], click, conv),
            "teacher_click_disc": L.ctr_loss_exposure(out["p_click_disc"], click),
        }
        teacher = t["teacher_cvr"] + cfg.discriminator_weight * t["teacher_click_disc"]
        t["total"] = (
            cfg.ctr_weight * t["ctr"] + cfg.ctcvr_weight * t["ctcvr"] + cfg.cvr_weight * t["cvr_click"]
            + cfg.distill_weight * t["distill_unclick"] + cfg.teacher_weight * teacher
        )
        return t
