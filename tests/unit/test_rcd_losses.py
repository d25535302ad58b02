"""RCD losses: hand-computed values on 4 x 4 maps, a loop reference, gradchecks, the RC sign, bad input."""

import math

import pytest
import torch
from torch.autograd import gradcheck

from rcca_core.rcd.losses import (
    RCDLossConfig, attention_control_loss, attention_control_terms, binarize, consistency_region,
    feature_distillation_loss, gaussian_smooth, mask_average_pool, normalize_maps, prepare_maps, rae_loss,
    rc_loss, rcr_loss, top_k_mean,
)


def two_maps(dtype=torch.float64):
    """Two normalised 4 x 4 maps; masks at 0.5: M0 = top-left 2 x 2, M1 = {(0,1), (0,3), (1,2), (1,3)}."""
    a0 = torch.tensor([[1.0, 0.8, 0.0, 0.0],
                       [0.6, 0.5, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.2]], dtype=dtype)
    a1 = torch.tensor([[0.0, 0.6, 0.3, 0.9],
                       [0.1, 0.3, 0.7, 1.0],
                       [0.4, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0]], dtype=dtype)
    return torch.stack([a0, a1])


def test_top_k_mean_by_hand_with_per_map_k_and_clamping():
    x = torch.tensor([[[3.0, 1.0], [4.0, 2.0]], [[0.5, 0.25], [1.0, 0.0]]])
    torch.testing.assert_close(top_k_mean(x, 2), torch.tensor([3.5, 0.75]))
    torch.testing.assert_close(top_k_mean(x, torch.tensor([1, 3])), torch.tensor([4.0, 1.75 / 3]))
    torch.testing.assert_close(top_k_mean(x, torch.tensor([0, 99])), torch.tensor([4.0, 0.4375]))  # k in [1, H*W]


def test_binarize_and_normalize():
    A = two_maps()
    M = binarize(A, 0.5)
    assert M.tolist()[0] == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert M.tolist()[1] == [[0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert not binarize(A.clone().requires_grad_(True)).requires_grad  # a constant mask
    torch.testing.assert_close(normalize_maps(A * torch.tensor([2.0, 0.5], dtype=A.dtype)[:, None, None]), A)
    assert normalize_maps(torch.zeros(1, 3, 3)).abs().sum() == 0  # all-zero map: no NaN
    assert binarize(torch.zeros(1, 3, 3)).sum() == 0


def test_rae_by_hand():
    A = two_maps()
    # lambda 0.5: K0 = 2 of |M0| = 4 -> F = (1.0 + 0.8) / 2; K1 = 2 -> F = (1.0 + 0.9) / 2
    assert rae_loss(A, lambda_rae=0.5).item() == pytest.approx((1 - 0.9) + (1 - 0.95))
    # lambda 1.0: the whole region: F0 = 2.9 / 4, F1 = 3.2 / 4
    assert rae_loss(A, lambda_rae=1.0).item() == pytest.approx((1 - 2.9 / 4) + (1 - 3.2 / 4))
    # paper default 0.3: K = floor(1.2) = 1 -> the peak, which is 1 for normalised maps
    assert rae_loss(A).item() == pytest.approx(0.0)
    # an empty mask adds 1
    assert rae_loss(A, torch.zeros_like(A), 0.5).item() == pytest.approx(2.0)


def test_rcr_by_hand():
    A = two_maps()
    # A1 inside M0: [0, 0.6, 0.1, 0.3]; A0 inside M1: [0.8, 0, 0, 0]; K = 2 for both
    assert rcr_loss(A, lambda_rcr=0.5).item() == pytest.approx((0.6 + 0.3) / 2 + (0.8 + 0.0) / 2)
    assert rcr_loss(A, lambda_rcr=1.0).item() == pytest.approx(1.0 / 4 + 0.8 / 4)
    assert rcr_loss(A[:1]).item() == 0.0  # one subject: no conflict term


def rc_maps(dtype=torch.float64):
    """Three subjects; subject 0 had 1.0 on the top-left 2 x 2 block t_c steps ago."""
    prev = torch.zeros(3, 4, 4, dtype=dtype)
    prev[0, :2, :2] = 1.0
    A = torch.zeros(3, 4, 4, dtype=dtype)
    A[0, :2, :2] = torch.tensor([[0.5, 0.1], [0.9, 0.2]])  # drops 0.5, 0.9, 0.1, 0.8 -> R0 = 3 pixels
    A[1, :2, :2] = torch.tensor([[0.4, 0.9], [0.7, 0.2]])  # the strongest competitor in R0
    A[2, :2, :2] = torch.tensor([[0.6, 0.3], [0.0, 0.0]])
    A[1, 3, 3] = A[2, 3, 3] = 1.0
    return A, prev


def test_consistency_region_and_rc_by_hand():
    A, prev = rc_maps()
    R = consistency_region(A, prev, 0.25)
    assert R[0].tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]] and R[1:].sum() == 0
    # lambda 1: K = 3; own F = (0.5 + 0.1 + 0.2) / 3; competitors (0.4 + 0.9 + 0.2) / 3 and (0.6 + 0.3) / 3
    assert rc_loss(A, prev, lambda_rc=1.0).item() == pytest.approx(0.8 / 3 + 1 - 1.5 / 3)
    # lambda 0.5: K = 1; own 0.5, strongest competitor 0.9
    assert rc_loss(A, prev, lambda_rc=0.5).item() == pytest.approx(0.5 + 1 - 0.9)
    assert rc_loss(A, R=R, lambda_rc=0.5).item() == pytest.approx(0.6)
    assert rc_loss(A, A.clone()).item() == 0.0  # no drop, no region, no loss
    assert rc_loss(A[:1], prev[:1], lambda_rc=1.0).item() == pytest.approx(0.8 / 3)  # one subject: own term only


def test_rc_sign_keeps_a_given_up_region_with_the_subject_that_took_it():
    A, prev = rc_maps()
    A.requires_grad_(True)
    rc_loss(A, prev, lambda_rc=1.0).backward()
    R0 = consistency_region(A, prev, 0.25)[0].bool()
    assert (A.grad[0][R0] > 0).all()  # descent lowers subject 0 where it gave the region up
    assert (A.grad[1][R0] < 0).all()  # and raises the strongest competitor there
    assert A.grad[2].abs().sum() == 0 and A.grad[0][~R0].abs().sum() == 0


def loop_reference(A, A_prev, cfg):
    """Per-subject loops straight from the formulas, for the vectorised code."""
    n, P = A.shape[0], A.shape[1] * A.shape[2]
    M = (A >= cfg.threshold).to(A.dtype)
    R = (A_prev - A > cfg.delta_rc).to(A.dtype)

    def F(x, lam, count):
        k = min(max(1, math.floor(lam * count + 1e-6)), P)
        return torch.topk(x.flatten(), k).values.mean()

    rae = sum(1 - F(M[i] * A[i], cfg.lambda_rae, M[i].sum().item()) for i in range(n))
    rcr = sum(F(M[i] * A[j], cfg.lambda_rcr, M[i].sum().item()) for i in range(n) for j in range(n) if j != i)
    rc = 0.0
    for i in range(n):
        c = R[i].sum().item()
        if c > 0:
            rc = rc + F(R[i] * A[i], cfg.lambda_rc, c) + 1 - max(F(R[i] * A[j], cfg.lambda_rc, c)
                                                                 for j in range(n) if j != i)
    return rae, rcr, rc


def test_vectorised_losses_match_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    A = normalize_maps(torch.rand(4, 16, 16, generator=g, dtype=torch.float64) ** 3)
    A_prev = normalize_maps(torch.rand(4, 16, 16, generator=g, dtype=torch.float64) ** 3)
    cfg = RCDLossConfig()
    terms = attention_control_terms(A, A_prev, cfg, prepare=False)
    rae, rcr, rc = loop_reference(A, A_prev, cfg)
    torch.testing.assert_close(terms["rae"], rae)
    torch.testing.assert_close(terms["rcr"], rcr)
    torch.testing.assert_close(terms["rc"], rc)
    torch.testing.assert_close(terms["total"], rae + rcr + rc)
    total = attention_control_loss(A, A_prev, cfg, prepare=False, weights=(2.0, 0.5, 0.0))
    torch.testing.assert_close(total, 2 * rae + 0.5 * rcr)


def test_combined_loss_prepares_maps_and_has_no_rc_without_history():
    g = torch.Generator().manual_seed(1)
    raw = torch.rand(2, 8, 8, generator=g)
    terms = attention_control_terms(raw)
    assert terms["rc"].item() == 0.0
    prepared = prepare_maps(raw)
    torch.testing.assert_close(terms["rae"], rae_loss(prepared))
    torch.testing.assert_close(terms["rcr"], rcr_loss(prepared, lambda_rcr=0.5))
    no_smooth = attention_control_terms(raw, config=RCDLossConfig(smooth=False))
    torch.testing.assert_close(no_smooth["rcr"], rcr_loss(normalize_maps(raw)))


def test_gaussian_smooth_by_hand():
    A = torch.zeros(1, 5, 5, dtype=torch.float64)
    A[0, 2, 2] = 1.0
    out = gaussian_smooth(A, sigma=0.5, kernel=3)
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * 0.25))
    g = g / g.sum()
    torch.testing.assert_close(out[0, 1:4, 1:4], g[:, None] * g[None, :])
    assert out.sum().item() == pytest.approx(1.0)
    assert gaussian_smooth(torch.ones(2, 1, 1)).shape == (2, 1, 1)  # too small to reflect: replicate


def small(n=3, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.05 + torch.rand(n, h, w, generator=g, dtype=torch.float64)).requires_grad_(True)


@pytest.mark.parametrize("name", ["rae", "rcr", "rc", "top_k", "normalize", "smooth", "combined_prepared",
                                  "combined_raw"])
def test_gradcheck(name):
    A = small()
    An = normalize_maps(A.detach())
    M = binarize(An, 0.5)
    R = (torch.rand(A.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) > 0.5).double()
    fns = {
        "rae": lambda a: rae_loss(a, M, 0.5),
        "rcr": lambda a: rcr_loss(a, M, 0.5),
        "rc": lambda a: rc_loss(a, R=R, lambda_rc=0.5),
        "top_k": lambda a: top_k_mean(a, torch.tensor([1, 3, 20])),
        "normalize": normalize_maps,
        "smooth": lambda a: gaussian_smooth(a, 0.7, 3),
        "combined_prepared": lambda a: attention_control_loss(a, masks=M),
        "combined_raw": lambda a: attention_control_loss(a, masks=M, prepare=False),
    }
    assert gradcheck(fns[name], (A,), eps=1e-6, atol=1e-5)


def test_gradcheck_feature_distillation_and_pool():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(2, 8, 8, generator=g, dtype=torch.float64)
    teacher = [torch.randn(2, 3, generator=g, dtype=torch.float64)]
    assert gradcheck(lambda f: feature_distillation_loss([mask_average_pool(f, masks)], teacher), (feats,),
                     eps=1e-6, atol=1e-5)


def test_mask_average_pool_by_hand():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4)
    masks = torch.zeros(2, 8, 8, dtype=torch.float64)
    masks[0, :4, :4] = 1.0  # -> top-left 2 x 2 of the 4 x 4 features after area resize
    masks[1] = 0.5  # soft and uniform -> the global mean
    pooled = mask_average_pool(feats, masks)
    torch.testing.assert_close(pooled[0], feats[:, :2, :2].mean(dim=(-2, -1)))
    torch.testing.assert_close(pooled[1], feats.mean(dim=(-2, -1)))
    # B = N pairs features i with mask i (one teacher generation per subject)
    both = torch.stack([feats, feats + 100])
    torch.testing.assert_close(mask_average_pool(both, masks), torch.stack([pooled[0], pooled[1] + 100]))
    with pytest.raises(ValueError, match="batch 3"):
        mask_average_pool(torch.zeros(3, 2, 4, 4), masks)
    assert mask_average_pool(feats, torch.zeros(1, 4, 4, dtype=torch.float64)).abs().sum() == 0  # empty mask


def test_feature_distillation_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert feature_distillation_loss(s, s * 3).item() == pytest.approx(0.0)
    assert feature_distillation_loss([s], [torch.tensor([[0.0, 1.0], [0.0, -1.0]])]).item() == pytest.approx(1 + 2)
    assert feature_distillation_loss([s, s], [s, -s]).item() == pytest.approx(0 + 4)  # summed over layers
    with pytest.raises(ValueError, match="same non-zero number"):
        feature_distillation_loss([s], [s, s])
    with pytest.raises(ValueError, match="N_subjects, C"):
        feature_distillation_loss([s], [s[:1]])


def test_half_precision_is_computed_in_float32():
    A = two_maps(torch.float16)
    assert rae_loss(A, lambda_rae=0.5).dtype == torch.float32
    assert torch.isfinite(attention_control_loss(A * 1e-3, A)).all()


def test_bad_input_is_a_clear_error():
    A = two_maps()
    with pytest.raises(ValueError, match=r"\(N_subjects, H, W\)"):
        rae_loss(A[0])
    with pytest.raises(ValueError, match="masks"):
        rae_loss(A, torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="A_prev"):
        rc_loss(A)
    with pytest.raises(ValueError, match="previous maps"):
        consistency_region(A, A[:1])
    with pytest.raises(ValueError, match="lambda_rae"):
        RCDLossConfig(lambda_rae=0.0)
    with pytest.raises(ValueError, match="odd kernel"):
        RCDLossConfig(kernel=4)
    with pytest.raises(ValueError, match="weights"):
        attention_control_loss(A, weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="at least one subject"):
        rae_loss(torch.zeros(0, 4, 4))


def test_defaults():
    cfg = RCDLossConfig()
    assert (cfg.lambda_rae, cfg.lambda_rcr, cfg.lambda_rc, cfg.delta_rc, cfg.t_c, cfg.threshold) == (
        0.3, 0.5, 0.5, 0.25, 1, 0.5)
    assert (cfg.smooth, cfg.sigma, cfg.kernel) == (True, 0.5, 3)
