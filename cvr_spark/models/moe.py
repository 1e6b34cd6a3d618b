"""Mixture-of-experts ESMM backbones: ``omoe``, ``mmoe``, ``cgc``, ``ple`` (MODELS.md §2).

CSTWA compares these as multi-task baselines on Ali-CCP without saying how they are trained;
here [I] they are ESMM-style: CTR and CVR towers on gated expert mixtures of one shared
embedding, p_ctcvr = p_ctr * p_cvr, and the ESMM loss L = L_ctr(D) + L_ctcvr(D).
Expert widths are not in the CSTWA text either [I]: one 128-unit layer per expert by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cvr_spark.models.esmm import CtrCvrModel, ESMMConfig, ESMMLoss
from cvr_spark.models.layers import GATE_MODES, MMoE, PLE
from cvr_spark.models.registry import register


@dataclass
class MMoEOptions:
    """Expert options of MMoE / OMoE (mixed into their config dataclasses)."""

    n_experts: int = 8
    expert_dims: list[int] = field(default_factory=lambda: [128])  # [I] not in CSTWA's text
    expert_dropout: float = 0.0

    def check_experts(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"n_experts: expected >= 1, got {self.n_experts}")
        if not self.expert_dims:
            raise ValueError("expert_dims: expected at least one layer width")


@dataclass
class CGCOptions:
    """Expert options of CGC / PLE; ``n_specific_experts`` has one count per task."""

    n_shared_experts: int = 4
    n_specific_experts: list[int] = field(default_factory=lambda: [2, 2])
    expert_dims: list[int] = field(default_factory=lambda: [128])  # [I] not in CSTWA's text
    expert_dropout: float = 0.0
    # softmax: per-task softmax over own + shared experts (CTnoCVR paper Eq. 3-4);
    # masked: the CTnoCVR code's softmax over all experts then masked, not renormalised.
    gate_mode: str = "softmax"
    n_levels: int = 1

    def check_experts(self, n_tasks: int) -> None:
        if len(self.n_specific_experts) != n_tasks:
            raise ValueError(
                f"n_specific_experts: expected {n_tasks} counts (one per task), got {self.n_specific_experts}"
            )
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode: expected one of {GATE_MODES}, got {self.gate_mode!r}")
        if self.n_levels < 1:
            raise ValueError(f"n_levels: expected >= 1, got {self.n_levels}")
        if not self.expert_dims:
            raise ValueError("expert_dims: expected at least one layer width")


def mmoe_backbone(opts: MMoEOptions, in_dim: int, n_tasks: int, shared_gate: bool) -> MMoE:
    """An MMoE (or OMoE when ``shared_gate``) backbone built from ``opts``."""
    opts.check_experts()
    return MMoE(in_dim, n_tasks, opts.n_experts, opts.expert_dims, opts.expert_dropout, shared_gate)


def cgc_backbone(opts: CGCOptions, in_dim: int, n_tasks: int) -> PLE:
    """A CGC (``n_levels=1``) or PLE backbone built from ``opts``."""
    opts.check_experts(n_tasks)
    return PLE(
        in_dim,
        opts.n_specific_experts,
        opts.n_shared_experts,
        opts.expert_dims,
        opts.expert_dropout,
        opts.gate_mode,
        opts.n_levels,
    )


@dataclass
class MMoEConfig(ESMMConfig, MMoEOptions):
    """ESMM loss weights + MMoE experts."""


@dataclass
class CGCConfig(ESMMConfig, CGCOptions):
    """ESMM loss weights + CGC experts (one level)."""


@dataclass
class PLEConfig(ESMMConfig, CGCOptions):
    """ESMM loss weights + PLE experts (two levels by default)."""

    n_levels: int = 2


@register("omoe")
class OMoEModel(ESMMLoss, CtrCvrModel):
    """OMoE: one softmax gate shared by the CTR and CVR towers over MLP experts.

    ESMM-style multi-task backbone (loss L = L_ctr(D) + L_ctcvr(D), p_ctcvr = p_ctr * p_cvr):
    a choice [I], CSTWA lists it as a baseline without its loss.
    """

    paper = "OMoE (one-gate mixture of experts; CSTWA baseline)"
    config_cls = MMoEConfig

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        return mmoe_backbone(self.cfg, in_dim, n_tasks, shared_gate=True)


@register("mmoe")
class MMoEModel(ESMMLoss, CtrCvrModel):
    """MMoE: a softmax gate per task over shared MLP experts.

    ESMM-style multi-task backbone (loss L = L_ctr(D) + L_ctcvr(D), p_ctcvr = p_ctr * p_cvr):
    a choice [I], CSTWA lists it as a baseline without its loss.
    """

    paper = "MMoE (Ma et al., KDD 2018)"
    config_cls = MMoEConfig

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        return mmoe_backbone(self.cfg, in_dim, n_tasks, shared_gate=False)


@register("cgc")
class CGCModel(ESMMLoss, CtrCvrModel):
    """CGC (single-level PLE): task-specific + shared experts, a gate per task.

    ``gate_mode`` picks the paper's per-task softmax or the CTnoCVR code's masked softmax
    without renormalisation. ESMM-style loss L = L_ctr(D) + L_ctcvr(D) [I].
    """

    paper = "CGC / single-level PLE (Tang et al., RecSys 2020)"
    config_cls = CGCConfig

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        return cgc_backbone(self.cfg, in_dim, n_tasks)


@register("ple")
class PLEModel(ESMMLoss, CtrCvrModel):
    """PLE: ``n_levels`` stacked CGC levels; intermediate levels also have a shared gate that
    feeds the next level's shared experts. ESMM-style loss L = L_ctr(D) + L_ctcvr(D) [I].
    """

    paper = "PLE (Tang et al., RecSys 2020)"
    config_cls = PLEConfig

    def build_backbone(self, in_dim: int, n_tasks: int) -> nn.Module:
        return cgc_backbone(self.cfg, in_dim, n_tasks)
