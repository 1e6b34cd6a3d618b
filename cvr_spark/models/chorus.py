"""ChorusCVR (Kuaishou, arXiv 2502.08277): CVR and unCVR towers that supervise each other
(NDM + SAM) on the entire space (MODELS.md §11)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from torch import Tensor, nn

from cvr_spark import losses as L
from cvr_spark.models.base import Batch, CVRModel, EmbeddingArch, FeatureSpec, ModelConfig
from cvr_spark.models.escm2 import SharedBottom, check_positive, check_towers, prob, tower
from cvr_spark.models.registry import register

CVR_LOSSES = ("ipw", "plain")


@dataclass
class ChorusConfig(ModelConfig):
    """ChorusCVR options: every open decision of MODELS.md §11 / §14.4 is a switch.

    - ``include_ctr_loss``: add L_ctr (absent from the printed Eq. 11; the ESMM backbone has it).
    - ``cvr_loss``: ``ipw`` uses L_cvr^IPW (Eq. 4) and L_uncvr^IPW (Eq. 9) as §2.1-2.2.1 imply;
      ``plain`` uses the printed unweighted L_cvr (Eq. 2) and L_uncvr (Eq. 8).
    - ``use_ndm`` (False = "w/o NDM": no L_ctuncvr), ``use_sam`` (False = "w/o SAM": no L_align).
    - Propensities: detached p_ctr, 1/clamp(p_ctr, ``propensity_clamp``, 1) on O and
      1/clamp(1 - p_ctr, ``propensity_clamp``, 1) on N, optionally capped at ``weight_cap`` and
      ``self_normalize``-d to mean 1 within each space of the batch. Sums are divided by |O_b| / |N_b|.
    - ``bottom_dims``: the shared-bottom encoder; [] = the towers read the flat embedding.
    Paper weights are all 1; the ``*_weight`` options are for ablations.
    """

    include_ctr_loss: bool = True
    cvr_loss: str = "ipw"
    use_ndm: bool = True
    use_sam: bool = True
    propensity_clamp: float = 0.01
    weight_cap: float | None = None
    self_normalize: bool = False
    bottom_dims: list[int] = field(default_factory=list)
    bottom_dropout: float = 0.0
    ctr_weight: float = 1.0
    ctcvr_weight: float = 1.0
    cvr_weight: float = 1.0
    uncvr_weight: float = 1.0
    ctuncvr_weight: float = 1.0
    align_weight: float = 1.0

    def __post_init__(self) -> None:
        check_towers(self)
        check_positive(propensity_clamp=self.propensity_clamp, weight_cap=self.weight_cap)
        if self.cvr_loss not in CVR_LOSSES:
            raise ValueError(f"cvr_loss must be one of {CVR_LOSSES}, got {self.cvr_loss!r}")


@register("chorus")
class ChorusCVR(CVRModel):
    """Shared-bottom encoder -> CTR, CVR and unCVR towers (sigmoid outputs).

    p_ctcvr = p_ctr p_cvr and p_ctuncvr = p_ctr p_uncvr (Eq. 6 read as a typo for these two
    products). Loss (Eq. 11, read per ``ChorusConfig``): [L_ctr] + L_ctcvr + L_cvr(^IPW) +
    L_uncvr(^IPW) + [L_ctuncvr: NDM] + [L_align^IPW: SAM, soft labels 1 - sg(other tower)].
    Outputs: CVR = p_cvr, CTCVR = p_ctr p_cvr; the unCVR tower is used only in training.
    """

    paper = "ChorusCVR (Kuaishou, arXiv 2502.08277)"
    config_cls = ChorusConfig
    outputs: ClassVar[tuple[str, ...]] = ("p_ctr", "p_cvr", "p_ctcvr", "p_uncvr", "p_ctuncvr")

    def __init__(self, spec: FeatureSpec, cfg: ChorusConfig) -> None:
        super().__init__(spec, cfg)
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, cfg.pooling)
        self.encoder = SharedBottom(self.embedding.out_dim, cfg.bottom_dims, cfg.bottom_dropout, 1)
        width = self.encoder.out_dims[0]
        self.towers = nn.ModuleDict({k: tower(width, cfg) for k in ("ctr", "cvr", "uncvr")})

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        (h,) = self.encoder(self.embedding.flat(batch))  # [B, H]
        p = {f"p_{k}": prob(t, h) for k, t in self.towers.items()}  # [B] each
        p["p_ctcvr"] = p["p_ctr"] * p["p_cvr"]
        p["p_ctuncvr"] = p["p_ctr"] * p["p_uncvr"]
        return p

    def _direct_terms(self, batch: Batch, out: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """L_cvr and L_uncvr on O: IPW (Eq. 4, 9) or plain (Eq. 2, 8)."""
        cfg: ChorusConfig = self.cfg
        click, conv = batch["click"], batch["conversion"]
        if cfg.cvr_loss == "plain":
            return L.cvr_loss_click(out["p_cvr"], click, conv), L.uncvr_loss_click(out["p_uncvr"], click, conv)
        ipw = dict(clamp_min=cfg.propensity_clamp, cap=cfg.weight_cap, self_normalize=cfg.self_normalize)
        cvr = L.ipw_bce_loss_click(out["p_cvr"], conv, out["p_ctr"], click, **ipw)
        uncvr = L.ipw_bce_loss_click(out["p_uncvr"], 1.0 - conv, out["p_ctr"], click, **ipw)
        return cvr, uncvr

    def loss(self, batch: Batch, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg: ChorusConfig = self.cfg
        click, conv = batch["click"], batch["conversion"]
        t: dict[str, Tensor] = {"ctcvr": L.ctcvr_loss_exposure(out["p_ctcvr"], click, conv)}
        t["cvr"], t["uncvr"] = self._direct_terms(batch, out)
        total = cfg.ctcvr_weight * t["ctcvr"] + cfg.cvr_weight * t["cvr"] + cfg.uncvr_weight * t["uncvr"]
        if cfg.include_ctr_loss:
            t["ctr"] = L.ctr_loss_exposure(out["p_ctr"], click)
            total = total + cfg.ctr_weight * t["ctr"]
        if cfg.use_ndm:
            t["ctuncvr"] = L.ctuncvr_loss_exposure(out["p_ctuncvr"], click, conv)
            total = total + cfg.ctuncvr_weight * t["ctuncvr"]
        if cfg.use_sam:
            t["align"] = L.chorus_align_loss(
                out["p_cvr"], out["p_uncvr"], out["p_ctr"], click,
                cfg.propensity_clamp, cfg.weight_cap, cfg.self_normalize,
            )
            total = total + cfg.align_weight * t["align"]
        t["total"] = total
        return t
