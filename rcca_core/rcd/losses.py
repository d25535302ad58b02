"""RCD losses: attention control (RAE, RCR, RC) and feature distillation, vectorised over subjects.

Attention maps ``A`` are (N, H, W): one map per subject (N subjects), values >= 0, already
averaged over heads and layers and softmaxed over the prompt tokens without the start token
(see design.md, "RCD, exactly"). ``prepare_maps`` smooths (optional) and normalises each map
to [0, 1] by its max; the losses expect such maps.

Notation: F(X, K) = mean of the K largest values of X (``top_k_mean``); |M| = number of
pixels of a binary mask; a fraction ``lam`` of a region of n pixels gives
K = max(1, floor(lam * n)), clamped to the number of pixels.

* L_RAE = sum_i (1 - F(M_i * A_i, K_i)), K_i from lambda_RAE and |M_i|: each subject's
  activated region M_i = binarize(A_i) should hold strong attention for that subject.
* L_RCR = sum_i sum_{j != i} F(M_i * A_j, K_i), K_i from lambda_RCR and |M_i|: other subjects'
  strongest attention inside subject i's region is suppressed (only the top fraction, so some
  overlap stays allowed).
* L_RC, see ``rc_loss``: a region that subject i gave up over t_c steps stays with the
  subject that took it.

Masks M_i and regions R_i are constants: computed from detached maps, no gradient flows
through the thresholds. All losses are differentiable in ``A`` (through sort/top-k, the max
normalisation and the max over competitors, which pass gradient to the selected entries) and
return 0-d tensors. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RCDLossConfig:
    """Attention-control settings.

    Sources: the paper's loss hyper-parameters are not given in the article
    (seeds/rcd-article.txt); lambda_rae = 0.3, lambda_rcr = 0.5, lambda_rc = 0.5,
    delta_rc = 0.25, t_c = 1 and the binarisation threshold 0.5 are the defaults of the
    article's illustrative code (AttentionController / RCDGenerator), unverified against the
    paper. Smoothing (on, sigma 0.5, 3 x 3) follows Attend-and-Excite, whose attention
    pre-processing RCD builds on. Unit weights: the article's loss_AC = RAE + RCR + RC.
    """

    lambda_rae: float = 0.3  # fraction of |M_i| averaged by RAE
    lambda_rcr: float = 0.5  # fraction of |M_i| averaged by RCR
    lambda_rc: float = 0.5  # fraction of |R_i| averaged by RC (its K)
    delta_rc: float = 0.25  # drop of a normalised map over t_c steps that marks a consistency region
    t_c: int = 1  # steps between A_prev and A (kept by the caller, recorded here for it)
    threshold: float = 0.5  # binarisation of the normalised map: M_i = A_i >= threshold
    smooth: bool = True
    sigma: float = 0.5
    kernel: int = 3
    w_rae: float = 1.0
    w_rcr: float = 1.0
    w_rc: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lambda_rae", "lambda_rcr", "lambda_rc", "threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"RCDLossConfig.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.delta_rc < 1.0:
            raise ValueError(f"RCDLossConfig.delta_rc must be in [0, 1), got {self.delta_rc}")
        if self.t_c < 1:
            raise ValueError(f"RCDLossConfig.t_c must be >= 1, got {self.t_c}")
        if self.kernel < 1 or self.kernel % 2 == 0 or self.sigma <= 0:
            raise ValueError(f"smoothing needs an odd kernel >= 1 and sigma > 0, got {self.kernel}, {self.sigma}")


def _maps(A: torch.Tensor, what: str = "attention maps") -> torch.Tensor:
    if not isinstance(A, torch.Tensor) or A.ndim != 3:
        raise ValueError(f"{what} must be a tensor (N_subjects, H, W), got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    if A.shape[0] < 1 or A.shape[1] < 1 or A.shape[2] < 1:
        raise ValueError(f"{what} must have at least one subject and one pixel, got {tuple(A.shape)}")
    return A.float() if A.dtype in (torch.float16, torch.bfloat16) else A


def normalize_maps(A: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each map divided by its max, so it lies in [0, 1]; an all-zero map stays zero."""
    A = _maps(A)
    return A / A.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)


def gaussian_smooth(A: torch.Tensor, sigma: float = 0.5, kernel: int = 3) -> torch.Tensor:
    """Per-map Gaussian blur (kernel x kernel, reflect padding; replicate on maps too small to reflect)."""
    A = _maps(A)
    if kernel < 1 or kernel % 2 == 0 or sigma <= 0:
        raise ValueError(f"gaussian_smooth needs an odd kernel >= 1 and sigma > 0, got {kernel}, {sigma}")
    if kernel == 1:
        return A
    x = torch.arange(kernel, dtype=A.dtype, device=A.device) - (kernel - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    weight = (g[:, None] * g[None, :])[None, None]
    p = kernel // 2
    mode = "reflect" if min(A.shape[-2:]) > p else "replicate"
    return F.conv2d(F.pad(A[:, None], (p, p, p, p), mode=mode), weight)[:, 0]


def prepare_maps(A: torch.Tensor, smooth: bool = True, sigma: float = 0.5, kernel: int = 3) -> torch.Tensor:
    """Optional Gaussian smoothing, then normalisation to [0, 1]: the maps the losses expect."""
    return normalize_maps(gaussian_smooth(A, sigma, kernel) if smooth else A)


def binarize(A: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Activated regions M_i = (A_i >= threshold) of normalised maps, as a constant 0/1 mask.

    A fixed threshold on the max-normalised map (not Otsu): the pixels with at least
    ``threshold`` of the map's peak. Computed without gradient; an all-zero map gives an
    empty mask.
    """
    A = _maps(A)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    with torch.no_grad():
        return (A.detach() >= threshold).to(A.dtype)


def _k(fraction: float, count: torch.Tensor, pixels: int) -> torch.Tensor:
    """K = max(1, floor(fraction * count)), clamped to the number of pixels."""
    return torch.floor(fraction * count.detach() + 1e-6).long().clamp(1, pixels)


def top_k_mean(X: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """F(X, k): mean of the k largest values over the last two dims of X (..., H, W).

    ``k`` is an int or an integer tensor broadcastable to X.shape[:-2] (one K per map); each is
    clamped to [1, H * W]. Differentiable (gradient 1/k on the selected entries).
    """
    flat = X.flatten(-2)
    n = flat.shape[-1]
    kt = torch.as_tensor(k, device=X.device).long().clamp(1, n).expand(flat.shape[:-1])
    csum = flat.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return csum.gather(-1, (kt - 1).unsqueeze(-1)).squeeze(-1) / kt.to(X.dtype)


def _masks(M: torch.Tensor | None, A: torch.Tensor, threshold: float, what: str = "masks") -> torch.Tensor:
    if M is None:
        return binarize(A, threshold)
    if M.shape != A.shape:
        raise ValueError(f"{what} {tuple(M.shape)} must match the attention maps {tuple(A.shape)}")
    return M.detach().to(A.dtype)


def rae_loss(A: torch.Tensor, M: torch.Tensor | None = None, lambda_rae: float = 0.3,
             threshold: float = 0.5) -> torch.Tensor:
    """L_RAE = sum_i (1 - F(M_i * A_i, K_i)), K_i = max(1, floor(lambda_rae * |M_i|)).

    ``M`` defaults to ``binarize(A, threshold)``. An empty mask contributes 1 (and no gradient).
    """
    A = _maps(A)
    M = _masks(M, A, threshold)
    k = _k(lambda_rae, M.sum(dim=(-2, -1)), A.shape[-1] * A.shape[-2])
    return (1.0 - top_k_mean(M * A, k)).sum()


def rcr_loss(A: torch.Tensor, M: torch.Tensor | None = None, lambda_rcr: float = 0.5,
             threshold: float = 0.5) -> torch.Tensor:
    """L_RCR = sum_i sum_{j != i} F(M_i * A_j, K_i), K_i = max(1, floor(lambda_rcr * |M_i|)).

    Zero for a single subject. ``M`` defaults to ``binarize(A, threshold)``.
    """
    A = _maps(A)
    M = _masks(M, A, threshold)
    n = A.shape[0]
    k = _k(lambda_rcr, M.sum(dim=(-2, -1)), A.shape[-1] * A.shape[-2])  # (N,)
    f = top_k_mean(M[:, None] * A[None, :], k[:, None])  # f[i, j] = F(M_i * A_j, K_i)
    off = 1.0 - torch.eye(n, dtype=A.dtype, device=A.device)
    return (f * off).sum()


def consistency_region(A: torch.Tensor, A_prev: torch.Tensor, delta_rc: float = 0.25) -> torch.Tensor:
    """R_i = pixels where subject i's normalised map fell by more than delta_rc: A_prev - A > delta_rc.

    A constant 0/1 mask (no gradient). ``A_prev`` are the maps recorded t_c steps earlier.
    """
    A = _maps(A)
    A_prev = _maps(A_prev, "previous attention maps")
    if A_prev.shape != A.shape:
        raise ValueError(f"previous maps {tuple(A_prev.shape)} must match the attention maps {tuple(A.shape)}")
    with torch.no_grad():
        return (A_prev.detach().to(A.dtype) - A.detach() > delta_rc).to(A.dtype)


def rc_loss(A: torch.Tensor, A_prev: torch.Tensor | None = None, lambda_rc: float = 0.5, delta_rc: float = 0.25,
            R: torch.Tensor | None = None) -> torch.Tensor:
    """Region consistency over t_c steps.

    With R_i = ``consistency_region(A, A_prev, delta_rc)`` (or ``R`` given) and
    K_i = max(1, floor(lambda_rc * |R_i|)):

        L_RC = sum_{i : |R_i| > 0} [ F(R_i * A_i, K_i) + (1 - max_{j != i} F(R_i * A_j, K_i)) ]

    (with one subject the bracket is F(R_i * A_i, K_i) alone; subjects with an empty R_i add 0).

    Sign, on purpose: minimising it LOWERS subject i's attention in the region it gave up and
    RAISES the strongest competitor's there, so the region stays with the subject that took it
    and does not flip back (the "cat at t1, bird at t2, cat at t3" splicing RC is meant to stop).
    This is design.md's "penalise F(R_i * A_i, K) and reward the strongest competitor's
    F(R_i * A_j, K)" and the paper as the article states it ("constrains the original token's
    attention to decrease in R_i while encouraging the most likely competing token's attention
    to increase"). Subject i's own region is still held by L_RAE on its current mask.
    """
    A = _maps(A)
    if R is None:
        if A_prev is None:
            raise ValueError("rc_loss needs the previous maps A_prev (t_c steps earlier) or a region R")
        R = consistency_region(A, A_prev, delta_rc)
    else:
        R = _masks(R, A, 0.5, "consistency regions")
    n = A.shape[0]
    count = R.sum(dim=(-2, -1))
    active = (count > 0).to(A.dtype)
    k = _k(lambda_rc, count, A.shape[-1] * A.shape[-2])
    f = top_k_mean(R[:, None] * A[None, :], k[:, None])  # f[i, j] = F(R_i * A_j, K_i)
    own = f.diagonal()
    if n == 1:
        return (active * own).sum()
    eye = torch.eye(n, dtype=torch.bool, device=A.device)
    competitor = f.masked_fill(eye, float("-inf")).amax(dim=1)
    return (active * (own + 1.0 - competitor)).sum()


def attention_control_terms(A: torch.Tensor, A_prev: torch.Tensor | None = None,
                            config: RCDLossConfig | None = None, masks: torch.Tensor | None = None,
                            prepare: bool = True, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """RAE, RCR, RC (0 without ``A_prev``) and their weighted sum "total".

    With ``prepare`` the raw maps (and ``A_prev``, without gradient) go through
    ``prepare_maps`` with the config's smoothing; ``masks`` default to ``binarize`` of the
    prepared maps. ``weights`` = (w_rae, w_rcr, w_rc) overrides the config's.
    """
    cfg = config or RCDLossConfig()
    A = _maps(A)
    if prepare:
        A = prepare_maps(A, cfg.smooth, cfg.sigma, cfg.kernel)
        if A_prev is not None:
            with torch.no_grad():
                A_prev = prepare_maps(_maps(A_prev, "previous attention maps").detach(), cfg.smooth, cfg.sigma,
                                      cfg.kernel)
    M = _masks(masks, A, cfg.threshold)
    w = tuple(weights) if weights is not None else (cfg.w_rae, cfg.w_rcr, cfg.w_rc)
    if len(w) != 3:
        raise ValueError(f"weights must be (w_rae, w_rcr, w_rc), got {w}")
    terms = {"rae": rae_loss(A, M, cfg.lambda_rae), "rcr": rcr_loss(A, M, cfg.lambda_rcr)}
    terms["rc"] = rc_loss(A, A_prev, cfg.lambda_rc, cfg.delta_rc) if A_prev is not None else A.new_zeros(())
    terms["total"] = w[0] * terms["rae"] + w[1] * terms["rcr"] + w[2] * terms["rc"]
    return terms


def attention_control_loss(A: torch.Tensor, A_prev: torch.Tensor | None = None,
                           config: RCDLossConfig | None = None, masks: torch.Tensor | None = None,
                           prepare: bool = True, weights: Sequence[float] | None = None) -> torch.Tensor:
    """L_AC = w_rae L_RAE + w_rcr L_RCR + w_rc L_RC (see ``attention_control_terms``)."""
    return attention_control_terms(A, A_prev, config, masks, prepare, weights)["total"]


def mask_average_pool(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mask-weighted mean feature per subject: (C, H, W) or (B, C, H, W) with masks (N, h, w) -> (N, C).

    Masks are resized to the features' H x W by area interpolation and act as weights (soft
    masks allowed). B = 1 (or 3-d features) pools every mask from the same features; B = N
    pools mask i from features i (teachers: one single-subject generation per subject). An
    empty mask gives a zero vector.
    """
    if features.ndim == 3:
        features = features[None]
    if features.ndim != 4 or masks.ndim != 3:
        raise ValueError(f"features must be (C, H, W) or (B, C, H, W) and masks (N, h, w), got "
                         f"{tuple(features.shape)} and {tuple(masks.shape)}")
    n, b = masks.shape[0], features.shape[0]
    if b not in (1, n):
        raise ValueError(f"features batch {b} must be 1 or the number of masks {n}")
    m = masks.to(features.dtype)
    if m.shape[-2:] != features.shape[-2:]:
        m = F.interpolate(m[:, None], size=features.shape[-2:], mode="area")[:, 0]
    num = (features * m[:, None]).sum(dim=(-2, -1))  # broadcast (B, C, H, W) * (N, 1, H, W) -> (N, C)
    return num / m.sum(dim=(-2, -1)).clamp_min(eps)[:, None]


def feature_distillation_loss(student: torch.Tensor | Sequence[torch.Tensor],
                              teacher: torch.Tensor | Sequence[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """L_FD = sum_layers sum_i (1 - cos(student_i, teacher_i)) over per-layer (N, C) pooled vectors.

    The teachers are constants in RCD (cached single-subject runs): pass them without grad.
    """
    if isinstance(student, torch.Tensor):
        student = [student]
    if isinstance(teacher, torch.Tensor):
        teacher = [teacher]
    if len(student) != len(teacher) or not student:
        raise ValueError(f"need the same non-zero number of student and teacher layers, got "
                         f"{len(student)} and {len(teacher)}")
    total = None
    for layer, (s, t) in enumerate(zip(student, teacher)):
        if s.ndim != 2 or s.shape != t.shape:
            raise ValueError(f"layer {layer}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must both be "
                             "(N_subjects, C)")
        term = (1.0 - F.cosine_similarity(s, t.to(s.dtype), dim=-1, eps=eps)).sum()
        total = term if total is None else total + term
    return total


__all__ = [
    "RCDLossConfig", "normalize_maps", "gaussian_smooth", "prepare_maps", "binarize", "top_k_mean",
    "rae_loss", "rcr_loss", "consistency_region", "rc_loss", "attention_control_terms",
    "attention_control_loss", "mask_average_pool", "feature_distillation_loss",
]
