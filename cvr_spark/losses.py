"""Every loss term, each a named pure function that says its sample space.

Spaces (MODELS.md §0): D = exposures (every row of the batch), O = clicked rows
(``click == 1``), N = unclicked rows. ``mean_S`` is a per-batch mean over S and is 0 when
S is empty in the batch. All inputs are probabilities of shape [B]; labels are float 0/1.

Naming: a function's name ends in the space its *normaliser* runs over: ``_exposure`` divides
by |D|, ``_click`` by |O|, ``_unclick`` by |N|. A term whose sum runs over O or N but is divided
by |D| (an unbiased estimate of a D risk, or the authors' "mean over the batch") says so in its
docstring. Propensity weights (1/p_ctr, 1/(1-p_ctr)) are always built from a *detached* p_ctr.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-7


def bce(p: Tensor, y: Tensor) -> Tensor:
    """Element-wise BCE(p, y) = -[y log p + (1-y) log(1-p)], p clamped to [EPS, 1-EPS]. [B]"""
    return F.binary_cross_entropy(p.clamp(EPS, 1 - EPS), y.to(p.dtype), reduction="none")


def space_mean(values: Tensor, mask: Tensor) -> Tensor:
    """mean over the rows where ``mask`` is 1; 0 (with a gradient path) when the space is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def exposure_mean(values: Tensor) -> Tensor:
    """mean over D (all rows); 0 for an empty batch."""
    return values.sum() / max(values.numel(), 1)


def inverse_propensity(p: Tensor, clamp_min: float = 0.01, cap: float | None = None) -> Tensor:
    """Detached 1 / clamp(p, clamp_min, 1), optionally capped at ``cap``: a constant weight."""
    w = 1.0 / p.detach().clamp(clamp_min, 1.0)
    return w.clamp_max(cap) if cap is not None else w


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise a ValueError naming both arguments when their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}; expected equal [B]")


def ctcvr_label(click: Tensor, conversion: Tensor) -> Tensor:
    """The impression-level CTCVR label o*r (click and conversion). [B]"""
    _check_pair("click", click, "conversion", conversion)
    return click * conversion


def ctnocvr_label(click: Tensor, conversion: Tensor) -> Tensor:
    """The CTnoCVR label c = o*(1-r): clicked and not converted (MODELS.md §10). [B]"""
    _check_pair("click", click, "conversion", conversion)
    return click * (1.0 - conversion)


def ctr_loss_exposure(p_ctr: Tensor, click: Tensor) -> Tensor:
    """Space D: mean_D BCE(p_ctr, o). 0 for an empty batch."""
    _check_pair("p_ctr", p_ctr, "click", click)
    return exposure_mean(bce(p_ctr, click))


def ctcvr_loss_exposure(p_ctcvr: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """Space D: mean_D BCE(p_ctcvr, o*r) (ESMM's CTCVR term; AITM's purchase head). 0 for an empty batch."""
    _check_pair("p_ctcvr", p_ctcvr, "click", click)
    return exposure_mean(bce(p_ctcvr, ctcvr_label(click, conversion)))


def cvr_loss_click(p_cvr: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """Space O: mean_O BCE(p_cvr, r) over clicked rows; 0 when the batch has no click."""
    _check_pair("p_cvr", p_cvr, "click", click)
    _check_pair("click", click, "conversion", conversion)
    return space_mean(bce(p_cvr, conversion), click)


def ctnocvr_loss_exposure(p_ctnocvr: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """Space D: mean_D BCE(p_ctnocvr, o*(1-r)) (CTnoCVR's own tower, §10). 0 for an empty batch."""
    _check_pair("p_ctnocvr", p_ctnocvr, "click", click)
    return exposure_mean(bce(p_ctnocvr, ctnocvr_label(click, conversion)))


def calibrator_loss_exposure(p_upper: Tensor, p_lower: Tensor) -> Tensor:
    """Space D: mean_D max(p_lower - p_upper, 0), AITM's label constraint (§4).

    It penalises a later-step probability (``p_lower``, e.g. the purchase head) that exceeds
    the earlier one (``p_upper``, e.g. p_ctr). No stop-gradient: both inputs receive gradients.
    0 for an empty batch.
    """
    _check_pair("p_upper", p_upper, "p_lower", p_lower)
    return exposure_mean(torch.relu(p_lower - p_upper))


def l2_penalty(params: Sequence[Tensor]) -> Tensor:
    """Parameter regulariser sum_t ||t||^2 / 2 (TensorFlow's ``l2_loss`` form, as AITM's code).

    Not a per-sample term: multiply by the model's L2 weight.

    Raises:
        ValueError: ``params`` is empty (nothing to regularise is almost always a wiring bug).
    """
    if len(params) == 0:
        raise ValueError("l2_penalty: no parameters given")
    return sum(p.pow(2).sum() for p in params) / 2.0


# =========================================================================== debiasing family
# ESCM2, DCMT, UKD, DDPO, NISE, ChorusCVR (MODELS.md §5-8, §11).
NORMALIZATIONS = ("exposure", "click")
REDUCTIONS = ("mean", "sum")


def _check_shapes(**tensors: Tensor) -> None:
    """Raise a ValueError naming the arguments when the tensors are not all the same [B] shape."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if any(len(s) != 1 or s != first for s in shapes.values()):
        raise ValueError(f"expected 1-d tensors of equal length [B], got shapes {shapes}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _normalise_over(values: Tensor, click: Tensor, normalization: str) -> Tensor:
    """Sum ``values`` [B] and divide by |D| (``exposure``) or by |O| (``click``, clamped at 1)."""
    _check_choice("normalization", normalization, NORMALIZATIONS)
    if normalization == "exposure":
        return exposure_mean(values)
    return values.sum() / click.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- propensity weights
def ipw_weights_click(
    p_ctr: Tensor, click: Tensor, clamp_min: float = 0.01, cap: float | None = None, self_normalize: bool = False
) -> Tensor:
    """Detached O-side weights o / clamp(p_ctr, clamp_min, 1), optionally capped at ``cap``.

    With ``self_normalize`` they are rescaled so that their mean over O is 1 (all-zero when O
    is empty). Rows of N get weight 0. [B]
    """
    w = click / p_ctr.detach().clamp(clamp_min, 1.0)
    if cap is not None:
        w = w.clamp_max(cap)
    if self_normalize:
        w = w * click.sum() / w.sum().clamp_min(EPS)
    return w


def ipw_weights_unclick(
    p_ctr: Tensor, click: Tensor, clamp_min: float = 0.01, cap: float | None = None, self_normalize: bool = False
) -> Tensor:
    """Detached N-side weights (1-o) / clamp(1-p_ctr, clamp_min, 1); as :func:`ipw_weights_click`. [B]"""
    return ipw_weights_click(1.0 - p_ctr, 1.0 - click, clamp_min, cap, self_normalize)


def ipw_bce_loss_click(
    p: Tensor, target: Tensor, p_ctr: Tensor, click: Tensor,
    clamp_min: float = 0.01, cap: float | None = None, self_normalize: bool = False,
) -> Tensor:
    """Space O: (1/|O|) sum_O BCE(p, target) / clamp(sg(p_ctr)). ChorusCVR Eq. 4/9/10; 0 if O is empty.

    ``target`` may carry gradient (the caller detaches soft labels when it means to).
    """
    _check_shapes(p=p, target=target, p_ctr=p_ctr, click=click)
    w = ipw_weights_click(p_ctr, click, clamp_min, cap, self_normalize)
    return (w * bce(p, target)).sum() / click.sum().clamp_min(1.0)


def ipw_bce_loss_unclick(
    p: Tensor, target: Tensor, p_ctr: Tensor, click: Tensor,
    clamp_min: float = 0.01, cap: float | None = None, self_normalize: bool = False,
) -> Tensor:
    """Space N: (1/|N|) sum_N BCE(p, target) / clamp(1 - sg(p_ctr)). ChorusCVR Eq. 10; 0 if N is empty."""
    return ipw_bce_loss_click(p, target, 1.0 - p_ctr, 1.0 - click, clamp_min, cap, self_normalize)


# --------------------------------------------------------------------------- ESCM2 (§5)
def escm2_ipw_cvr_loss(
    p_cvr: Tensor, p_ctr: Tensor, click: Tensor, conversion: Tensor,
    clamp_min: float = 0.01, cap: float | None = None, normalization: str = "exposure",
) -> Tensor:
    """Space D estimator, sum over O: sum_D o BCE(p_cvr, r) / clamp(sg(p_ctr)), divided by |D|
    (``exposure``: the paper's ideal-risk estimator) or |O| (``click``: MMLRec's effective form)."""
    _check_shapes(p_cvr=p_cvr, p_ctr=p_ctr, click=click, conversion=conversion)
    w = ipw_weights_click(p_ctr, click, clamp_min, cap)
    return _normalise_over(w * bce(p_cvr, conversion), click, normalization)


def escm2_dr_error_loss(
    p_cvr: Tensor, err_hat: Tensor, p_ctr: Tensor, click: Tensor, conversion: Tensor,
    clamp_min: float = 0.01, cap: float | None = None, normalization: str = "exposure",
) -> Tensor:
    """Space D: sum_D [ê + o (e - ê) / clamp(sg(p_ctr))] / |D| (or / |O|), e = BCE(p_cvr, r).

    The doubly-robust error term of ESCM2-DR: the imputed error ê [B] on every exposure,
    corrected on O by the propensity-weighted residual. Gradients reach p_cvr and ê.
    """
    _check_shapes(p_cvr=p_cvr, err_hat=err_hat, p_ctr=p_ctr, click=click, conversion=conversion)
    w = ipw_weights_click(p_ctr, click, clamp_min, cap)
    e = bce(p_cvr, conversion)
    return _normalise_over(err_hat + w * (e - err_hat), click, normalization)


def escm2_dr_imputation_loss(
    p_cvr: Tensor, err_hat: Tensor, p_ctr: Tensor, click: Tensor, conversion: Tensor,
    clamp_min: float = 0.01, cap: float | None = None, normalization: str = "exposure",
    detach_error: bool = False,
) -> Tensor:
    """Space D estimator, sum over O: sum_D o (e - ê)^2 / clamp(sg(p_ctr)), divided by |D| (or |O|).

    Trains the imputation tower ê toward the observed error e = BCE(p_cvr, r). With
    ``detach_error`` e is a constant here (only ê learns from this term); the default sends
    gradient to both, as PaddleRec's ``counterfact_dr`` does.
    """
    _check_shapes(p_cvr=p_cvr, err_hat=err_hat, p_ctr=p_ctr, click=click, conversion=conversion)
    w = ipw_weights_click(p_ctr, click, clamp_min, cap)
    e = bce(p_cvr, conversion)
    if detach_error:
        e = e.detach()
    return _normalise_over(w * (e - err_hat).pow(2), click, normalization)


# --------------------------------------------------------------------------- DCMT (§6)
def dcmt_twin_ipw_loss_exposure(
    p_cvr: Tensor, p_cvr_cf: Tensor, p_ctr: Tensor, click: Tensor, conversion: Tensor,
    clamp_min: float = 0.01, cap: float | None = None,
) -> Tensor:
    """Space D (factual part sums over O, counterfactual part over N), divided by |D|:

    (1/|D|) sum_D [ o BCE(r̂, r) / ô + (1-o) BCE(r̂*, 1-r) / (1-ô) ], ô = clamp(sg(p_ctr)).
    On N, r = 0, so the counterfactual label is 1.
    """
    _check_shapes(p_cvr=p_cvr, p_cvr_cf=p_cvr_cf, p_ctr=p_ctr, click=click, conversion=conversion)
    w_o = ipw_weights_click(p_ctr, click, clamp_min, cap)
    w_n = ipw_weights_unclick(p_ctr, click, clamp_min, cap)
    return exposure_mean(w_o * bce(p_cvr, conversion) + w_n * bce(p_cvr_cf, 1.0 - conversion))


def twin_constraint_loss_exposure(p_cvr: Tensor, p_cvr_cf: Tensor) -> Tensor:
    """Space D: mean_D |1 - (r̂ + r̂*)|, DCMT's soft counterfactual prior r̂ + r̂* ≈ 1."""
    _check_shapes(p_cvr=p_cvr, p_cvr_cf=p_cvr_cf)
    return exposure_mean((1.0 - (p_cvr + p_cvr_cf)).abs())


# --------------------------------------------------------------------------- UKD (§7)
def bernoulli_kl(p: Tensor, q: Tensor) -> Tensor:
    """Element-wise KL(Bern(p) || Bern(q)), both clamped to [EPS, 1-EPS]. [B]"""
    p, q = p.clamp(EPS, 1 - EPS), q.clamp(EPS, 1 - EPS)
    return p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())


def uncertainty_distill_loss_unclick(
    p_a: Tensor, p_b: Tensor, soft_label: Tensor, click: Tensor, detach_uncertainty: bool = False
) -> Tensor:
    """Space N: mean_N [ exp(-u) KD + u ], UKD's uncertainty-regularised distillation.

    KD = (BCE(p_a, ỹ) + BCE(p_b, ỹ)) / 2 with ỹ = sg(soft_label) (the teacher's pseudo-label);
    u = (KL(p_a||p_b) + KL(p_b||p_a)) / 2, the disagreement of the student's two CVR heads.
    With ``detach_uncertainty`` u is a constant (the ``+ u`` term then has no gradient).
    0 when N is empty.
    """
    _check_shapes(p_a=p_a, p_b=p_b, soft_label=soft_label, click=click)
    y = soft_label.detach()
    kd = 0.5 * (bce(p_a, y) + bce(p_b, y))
    u = 0.5 * (bernoulli_kl(p_a, p_b) + bernoulli_kl(p_b, p_a))
    if detach_uncertainty:
        u = u.detach()
    return space_mean(torch.exp(-u) * kd + u, 1.0 - click)


# --------------------------------------------------------------------------- NISE (§8)
def cvr_loss_click_over_exposure(p_cvr: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """Sum over O, divided by |D|: (1/|D|) sum_O BCE(p_cvr, r) (NISE's L_O, DDPO's L_conv)."""
    _check_shapes(p_cvr=p_cvr, click=click, conversion=conversion)
    return exposure_mean(click * bce(p_cvr, conversion))


def entropy_loss_unclick_over_exposure(p_cvr: Tensor, click: Tensor) -> Tensor:
    """Sum over N, divided by |D|: (1/|D|) sum_N BCE(p_cvr, p_cvr), the target **not** detached.

    With a differentiable target BCE(p, p) is the Bernoulli entropy H(p), whose gradient
    log((1-p)/p) pushes p away from 1/2: entropy minimisation on N (NISE's L_N). Detaching the
    target would make the gradient 0.
    """
    _check_shapes(p_cvr=p_cvr, click=click)
    return exposure_mean((1.0 - click) * bce(p_cvr, p_cvr))


def nise_dynamic_weight(l_ctr: Tensor, l_cvr: Tensor, alpha: float = 1.0, beta_max: float = 50.0) -> float:
    """β_t = α min(L_ctr / L_cvr, β) from the current batch's values (a float, no gradient).

    ``l_cvr`` = L_O + L_N. When it is 0 (or not finite) the ratio is taken as +inf: β_t = α β.
    """
    num, den = float(l_ctr.detach()), float(l_cvr.detach())
    ratio = num / den if den > 0 and math.isfinite(den) else math.inf
    return alpha * min(ratio, beta_max)


# --------------------------------------------------------------------------- DDPO (§8)
def ddpo_soft_cvr_label(conversion: Tensor, q: Tensor) -> Tensor:
    """DDPO's click-space target ỹ = min(r + sg(q), 1): clicked non-converters get q. [B], detached."""
    _check_shapes(conversion=conversion, q=q)
    return (conversion + q.detach()).clamp_max(1.0)


def ddpo_selfnorm_weights(propensity: Tensor, mask: Tensor, floor: float = 1e-6, clip: float = 15.0) -> Tensor:
    """DDPO's detached weights 1/max(propensity, floor), divided by sum_B mask * w.

    If the space (``mask``) is empty the code skips normalisation and clips to [-clip, clip];
    those weights then multiply a zero mask. [B]
    """
    w = 1.0 / propensity.detach().clamp_min(floor)
    total = (mask * w).sum()
    return torch.where(mask.sum() > 0, w / total.clamp_min(EPS), w.clamp(-clip, clip))


def _ddpo_reduce(values: Tensor, reduction: str) -> Tensor:
    _check_choice("reduction", reduction, REDUCTIONS)
    return exposure_mean(values) if reduction == "mean" else values.sum()


def ddpo_click_loss(
    p_cvr: Tensor, q: Tensor, p_ctr: Tensor, click: Tensor, conversion: Tensor,
    reduction: str = "mean", floor: float = 1e-6,
) -> Tensor:
    """Sum over O: L_O = reduce_B[ o w̄ BCE(p_cvr, min(r + sg(q), 1)) ], w̄ = self-normalised 1/p_ctr.

    ``reduction='mean'`` divides by |D| as the authors' code does (so L_O is ≈ 1/|D| of a
    weighted mean over O); ``'sum'`` gives the self-normalised weighted mean over O itself.
    """
    _check_shapes(p_cvr=p_cvr, q=q, p_ctr=p_ctr, click=click, conversion=conversion)
    w = ddpo_selfnorm_weights(p_ctr, click, floor)
    return _ddpo_reduce(click * w * bce(p_cvr, ddpo_soft_cvr_label(conversion, q)), reduction)


def ddpo_unclick_loss(
    p_cvr: Tensor, q: Tensor, p_ctr: Tensor, click: Tensor, reduction: str = "mean", floor: float = 1e-6
) -> Tensor:
    """Sum over N: L_N = reduce_B[ (1-o) w̄^N BCE(p_cvr, sg(q)) ], w̄^N = self-normalised 1/(1-p_ctr).

    ``reduction`` as in :func:`ddpo_click_loss`.
    """
    _check_shapes(p_cvr=p_cvr, q=q, p_ctr=p_ctr, click=click)
    unclick = 1.0 - click
    w = ddpo_selfnorm_weights(1.0 - p_ctr, unclick, floor)
    return _ddpo_reduce(unclick * w * bce(p_cvr, q.detach()), reduction)


# --------------------------------------------------------------------------- ChorusCVR (§11)
def uncvr_loss_click(p_uncvr: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """Space O: mean_O BCE(p_uncvr, 1-r) (ChorusCVR Eq. 8); 0 when the batch has no click."""
    _check_shapes(p_uncvr=p_uncvr, click=click, conversion=conversion)
    return space_mean(bce(p_uncvr, 1.0 - conversion), click)


def ctuncvr_loss_exposure(p_ctuncvr: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """Space D: mean_D BCE(p_ctr p_uncvr, o(1-r)) (ChorusCVR Eq. 7, the NDM term)."""
    _check_shapes(p_ctuncvr=p_ctuncvr, click=click, conversion=conversion)
    return exposure_mean(bce(p_ctuncvr, click * (1.0 - conversion)))


def aligned_soft_labels(p_cvr: Tensor, p_uncvr: Tensor) -> tuple[Tensor, Tensor]:
    """ChorusCVR's SAM soft labels (1 - sg(p_uncvr), 1 - sg(p_cvr)): targets for CVR and unCVR."""
    _check_shapes(p_cvr=p_cvr, p_uncvr=p_uncvr)
    return 1.0 - p_uncvr.detach(), 1.0 - p_cvr.detach()


def chorus_align_loss(
    p_cvr: Tensor, p_uncvr: Tensor, p_ctr: Tensor, click: Tensor,
    clamp_min: float = 0.01, cap: float | None = None, self_normalize: bool = False,
) -> Tensor:
    """Spaces O and N: ChorusCVR Eq. 10, L_align^IPW (each part normalised by its own space)::

        (1/|O|) sum_O BCE(p_cvr, 1-sg(p_uncvr)) / ô  + (1/|N|) sum_N BCE(p_cvr, 1-sg(p_uncvr)) / (1-ô)
      + (1/|O|) sum_O BCE(p_uncvr, 1-sg(p_cvr)) / ô  + (1/|N|) sum_N BCE(p_uncvr, 1-sg(p_cvr)) / (1-ô)

    with ô = clamp(sg(p_ctr), clamp_min, 1) (and 1-ô clamped likewise). An empty O or N part is 0.
    """
    _check_shapes(p_cvr=p_cvr, p_uncvr=p_uncvr, p_ctr=p_ctr, click=click)
    y_cvr, y_uncvr = aligned_soft_labels(p_cvr, p_uncvr)
    total = p_cvr.new_zeros(())
    for p, y in ((p_cvr, y_cvr), (p_uncvr, y_uncvr)):
        total = total + ipw_bce_loss_click(p, y, p_ctr, click, clamp_min, cap, self_normalize)
        total = total + ipw_bce_loss_unclick(p, y, p_ctr, click, clamp_min, cap, self_normalize)
    return total


# =========================================================================== CSTWA
# MODELS.md §9.5, Eq. 17-20: L_ctr = ctr_loss_exposure, L_cvr = curse_escaper_loss_exposure with
# detached curse_escaper_weights, L_cal = calibrator_loss_exposure, L = cstwa_total.
# Functional forms of the Curse Escaper weight inside its two regions (MODELS.md §9.5 / §14.1):
# "power": FP min((ŷ/θ_h)^γ, cap), FN min((θ_l/ŷ)^γ, cap)  (the §9.5 reconstruction, default)
# "constant": min(γ, cap) in both regions.
CE_FORMS = ("power", "constant")


def curse_escaper_thresholds(history: Tensor, high_q: float = 0.99, low_q: float = 0.10) -> tuple[Tensor, Tensor]:
    """(θ_h, θ_l) = the ``high_q`` and ``low_q`` quantiles of recent CTR predictions (linear
    interpolation, numpy's default), detached 0-d tensors.

    Raises:
        ValueError: ``history`` is empty or the quantiles are not 0 <= low_q <= high_q <= 1.
    """
    if history.numel() == 0:
        raise ValueError("curse_escaper_thresholds: empty history of CTR predictions")
    if not 0.0 <= low_q <= high_q <= 1.0:
        raise ValueError(f"curse_escaper_thresholds: expected 0 <= low_q <= high_q <= 1, got {low_q}, {high_q}")
    qs = torch.tensor([high_q, low_q], dtype=torch.float32, device=history.device)
    theta = torch.quantile(history.detach().float().flatten(), qs)  # [2]
    return theta[0], theta[1]


def curse_escaper_weights(
    p_ctr: Tensor,
    purchase: Tensor,
    theta_high: Tensor | float,
    theta_low: Tensor | float,
    gamma: float = 3.0,
    cap: float = 4.0,
    form: str = "power",
) -> Tensor:
    """Per-row Curse Escaper weights w [B] (space D), detached: constants of the loss.

    w = weight_fp  where ŷ_ctr > θ_h and purchase == 0 (false positive of the click model),
        weight_fn  where ŷ_ctr < θ_l and purchase == 1 (false negative),
        1          elsewhere;
    with ``form="power"``: weight_fp = min((ŷ_ctr/θ_h)^γ, cap), weight_fn = min((θ_l/ŷ_ctr)^γ, cap)
    (ŷ_ctr clamped at EPS); with ``form="constant"``: both = min(γ, cap). The cap applies per term.

    Raises:
        ValueError: unknown ``form``, shape mismatch, or ``cap`` < 1.
    """
    _check_pair("p_ctr", p_ctr, "purchase", purchase)
    if form not in CE_FORMS:
        raise ValueError(f"curse_escaper_weights: form must be one of {CE_FORMS}, got {form!r}")
    if cap < 1.0:
        raise ValueError(f"curse_escaper_weights: cap must be >= 1, got {cap}")
    p = p_ctr.detach().clamp_min(EPS)
    th_high = torch.as_tensor(theta_high, dtype=p.dtype, device=p.device).clamp_min(EPS)
    th_low = torch.as_tensor(theta_low, dtype=p.dtype, device=p.device)
    y = purchase.detach().to(p.dtype)
    false_pos = (p > th_high) & (y == 0)
    false_neg = (p < th_low) & (y == 1)
    if form == "power":
        w_fp, w_fn = (p / th_high).pow(gamma).clamp_max(cap), (th_low / p).pow(gamma).clamp_max(cap)
    else:
        w_fp = w_fn = torch.full_like(p, min(gamma, cap))
    ones = torch.ones_like(p)
    return torch.where(false_pos, w_fp, torch.where(false_neg, w_fn, ones))


def curse_escaper_loss_exposure(p_purchase: Tensor, click: Tensor, conversion: Tensor, weights: Tensor) -> Tensor:
    """Space D: mean_D w * BCE(ŷ_cvr, o*r), CSTWA's Eq. 18. ``weights`` [B] are used as given
    (detached); 0 for an empty batch."""
    _check_pair("p_purchase", p_purchase, "click", click)
    _check_pair("p_purchase", p_purchase, "weights", weights)
    _check_pair("click", click, "conversion", conversion)
    return exposure_mean(weights.detach() * bce(p_purchase, click * conversion))


def cstwa_total(ctr: Tensor, cvr: Tensor, calibrator: Tensor,
                weights: tuple[float, float, float] = (1.0, 1.0, 0.6)) -> Tensor:
    """Eq. 20: λ1 L_ctr + λ2 L_cvr + λ3 L_cal (L2 is Adam weight decay, not a term here)."""
    return weights[0] * ctr + weights[1] * cvr + weights[2] * calibrator
