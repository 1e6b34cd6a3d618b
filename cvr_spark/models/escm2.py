"""ESCM² (Wang et al., SIGIR 2022): ESMM plus a counterfactual CVR risk, IPW or DR (MODELS.md §5).

Also holds the small helpers the debiasing family (DCMT, UKD, DDPO, NISE, ChorusCVR) shares:
:func:`check_towers`, :func:`tower`, :func:`prob` and :class:`SharedBottom`.

Shape letters: B batch, I flat input width, H representation width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from cvr_spark import losses as L
from cvr_spark.models.base import MLP, Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig
from cvr_spark.models.layers import MMoE
from cvr_spark.models.registry import register

BACKBONES = ("shared_bottom", "mmoe")
IMPUTATION_ACTIVATIONS = ("sigmoid", "softplus")


def check_towers(cfg: ModelConfig) -> None:
    """Raise a ValueError naming the keys when ``tower_dims`` / ``dropout`` disagree."""
    if not cfg.tower_dims:
        raise ValueError("tower_dims: expected at least one layer width")
    if len(cfg.dropout) != len(cfg.tower_dims):
        raise ValueError(f"dropout has {len(cfg.dropout)} rates, tower_dims {len(cfg.tower_dims)} layers; expected equal")


def check_positive(**values: float | None) -> None:
    """Raise a ValueError naming the option when a given value is not > 0 (None is allowed)."""
    for k, v in values.items():
        if v is not None and not v > 0:
            raise ValueError(f"{k}: expected > 0, got {v}")


def tower(in_dim: int, cfg: ModelConfig, batch_norm: bool = False) -> MLP:
    """An MLP tower of ``cfg.tower_dims`` / ``cfg.dropout`` ending in a Linear(H -> 1) logit."""
    return MLP(in_dim, cfg.tower_dims, cfg.dropout, batch_norm=batch_norm, out_dim=1)


def prob(module: nn.Module, x: Tensor) -> Tensor:
    """sigmoid(module(x)) squeezed to [B] (``module`` returns logits [B, 1])."""
    return torch.sigmoid(module(x)).squeeze(-1)  # [B]


class SharedBottom(nn.Module):
    """Shared-bottom backbone: one MLP on the input, its output fed to every task.

    ``dims=[]`` is the identity (ESMM: every tower reads the flat embedding).
    """

    def __init__(self, in_dim: int, dims: Sequence[int], dropout: float, n_tasks: int) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, dims, dropout) if dims else nn.Identity()
        self.out_dims = [int(dims[-1]) if dims else in_dim] * n_tasks

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.mlp(x)  # [B, H]
        return [h] * len(self.out_dims)


@dataclass
class ESCM2Config(ModelConfig):
    """``escm2_ipw`` options: L = w_ctr L_ctr + λ_c L_CVR^IPW + λ_g L_CTCVR (MODELS.md §5, §14.5).

    λ_c / λ_g default to MMLRec's 0.1 / 1 (PaddleRec: 0.5 / 0.5). The IPW weight is
    o / clamp(sg(p_ctr), ``propensity_clamp``, 1), capped at ``weight_cap`` (None: no cap;
    MMLRec/PaddleRec cap at 15), and the sum is divided by |D| (``ipw_normalization='exposure'``,
    the paper's estimator, recommended) or |O| (``'click'``, MMLRec's effective form).
    """

    ctr_weight: float = 1.0
    cvr_weight: float = 0.1  # λ_c
    ctcvr_weight: float = 1.0  # λ_g
    ipw_normalization: str = "exposure"
    propensity_clamp: float = 0.01
    weight_cap: float | None = None
    backbone: str = "shared_bottom"  # or "mmoe" (the paper's backbone [P~])
    bottom_dims: list[int] = field(default_factory=list)  # shared bottom; [] = towers read the embedding
    bottom_dropout: float = 0.0
    n_experts: int = 8  # mmoe only
    expert_dims: list[int] = field(default_factory=lambda: [64])  # mmoe only

    def __post_init__(self) -> None:
        check_towers(self)
        check_positive(propensity_clamp=self.propensity_clamp, weight_cap=self.weight_cap)
        if self.ipw_normalization not in L.NORMALIZATIONS:
            raise ValueError(f"ipw_normalization must be one of {L.NORMALIZATIONS}, got {self.ipw_normalization!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")


@dataclass
class ESCM2DRConfig(ESCM2Config):
    """``escm2_dr`` options: as ``escm2_ipw`` with L_CVR^DR = error term + imputation term.

    ``imputation_activation``: ê = sigmoid(logit) as PaddleRec (ê in (0, 1)), or softplus
    (ê in (0, inf), the range of a BCE). ``dr_detach_error``: the imputation term trains ê
    only (e detached); default False sends gradient to both, as PaddleRec does.
    """

    imputation_activation: str = "sigmoid"
    dr_detach_error: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.imputation_activation not in IMPUTATION_ACTIVATIONS:
            raise ValueError(
                f"imputation_activation must be one of {IMPUTATION_ACTIVATIONS}, got {self.imputation_activation!r}"
            )


class ESCM2Base(CVRModel):
    """Embedding -> backbone (shared bottom or MMoE) -> CTR, CVR (and imputation) towers."""

    paper = "ESCM2 (Wang et al., SIGIR 2022)"
    n_towers: ClassVar[int] = 2
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr")

    def __init__(self, spec: FeatureSpec, cfg: ESCM2Config) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        in_dim = self.embedding.out_dim
        if cfg.backbone == "mmoe":
            self.backbone = MMoE(in_dim, self.n_towers, cfg.n_experts, cfg.expert_dims, cfg.bottom_dropout)
        else:
            self.backbone = SharedBottom(in_dim, cfg.bottom_dims, cfg.bottom_dropout, self.n_towers)
        self.towers = nn.ModuleList(tower(d, cfg) for d in self.backbone.out_dims)

    def tower_logits(self, batch: Batch) -> list[Tensor]:
        """One logit [B] per tower (CTR, CVR[, imputation])."""
        hs = self.backbone(self.embedding.flat(batch))  # n_towers x [B, H]
        return [t(h).squeeze(-1) for t, h in zip(self.towers, hs)]  # n_towers x [B]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.tower_logits(batch)
        p_ctr, p_cvr = torch.sigmoid(logits[0]), torch.sigmoid(logits[1])
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr}

    def counterfactual_terms(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The named parts of L_CVR (their sum is L_CVR)."""
        raise NotImplementedError

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: ESCM2Config = self.cfg
        click, conv = batch["click"], batch["conversion"]
        terms = {
            "ctr": L.ctr_loss_exposure(out["p_ctr"], click),
            "ctcvr": L.ctcvr_loss_exposure(out["p_ctcvr"], click, conv),
            **self.counterfactual_terms(batch, out),
        }
        cvr = sum(v for k, v in terms.items() if k.startswith("cvr"))
        terms["total"] = cfg.ctr_weight * terms["ctr"] + cfg.cvr_weight * cvr + cfg.ctcvr_weight * terms["ctcvr"]
        return terms


@register("escm2_ipw")
class ESCM2IPW(ESCM2Base):
    """ESCM²-IPW: ESMM's two terms plus λ_c (1/|D|) sum_O BCE(p_cvr, r) / sg(p_ctr).

    The propensity is the model's own detached, clamped p_ctr (§5 [I]). Outputs:
    CVR = p_cvr, CTCVR = p_ctr * p_cvr.
    """

    paper = "ESCM2-IPW (Wang et al., SIGIR 2022)"
    config_cls = ESCM2Config

    def counterfactual_terms(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: ESCM2Config = self.cfg
        ipw = L.escm2_ipw_cvr_loss(
            out["p_cvr"], out["p_ctr"], batch["click"], batch["conversion"],
            cfg.propensity_clamp, cfg.weight_cap, cfg.ipw_normalization,
        )
        return {"cvr_ipw": ipw}


@register("escm2_dr")
class ESCM2DR(ESCM2Base):
    """ESCM²-DR: as ESCM²-IPW with the doubly-robust risk and a third (imputation) tower.

    L_CVR^DR = (1/|D|) sum_D [ê + o (e - ê)/ô] + (1/|D|) sum_D o (e - ê)^2 / ô, e = BCE(p_cvr, r),
    ê = the imputation tower's output ``err_hat``. Both parts are trained jointly (no
    alternating updates), as PaddleRec does; λ_c weighs their sum.
    """

    paper = "ESCM2-DR (Wang et al., SIGIR 2022)"
    config_cls = ESCM2DRConfig
    n_towers = 3
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr", "err_hat")

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        logit_ctr, logit_cvr, logit_imp = self.tower_logits(batch)
        p_ctr, p_cvr = torch.sigmoid(logit_ctr), torch.sigmoid(logit_cvr)
        act = torch.sigmoid if self.cfg.imputation_activation == "sigmoid" else nn.functional.softplus
        return {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctr * p_cvr, "err_hat": act(logit_imp)}

    def counterfactual_terms(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: ESCM2DRConfig = self.cfg
        args = (out["p_cvr"], out["err_hat"], out["p_ctr"], batch["click"], batch["conversion"],
                cfg.propensity_clamp, cfg.weight_cap, cfg.ipw_normalization)
        return {
            "cvr_dr_error": L.escm2_dr_error_loss(*args),
            "cvr_dr_imputation": L.escm2_dr_imputation_loss(*args, detach_error=cfg.dr_detach_error),
        }
