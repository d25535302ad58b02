"""SemanticDraw pieces against hand-computed references."""

import math

import pytest
import torch

from rcca_core.palette import Palette, PaletteError, RegionSpec
from rcca_core.semantic_draw import (SemanticDrawDenoiser, SemanticDrawOptions, SemanticDrawState, bbox_center_shift,
                                     gaussian_blur, noise_levels, pre_average, quantize_masks)
from rcca_core.stream import SlotBatch


def test_pre_averaging_formula():
    x0_r = torch.stack([torch.full((1, 1, 3), 2.0), torch.full((1, 1, 3), 4.0)])  # (P=2, C=1, 1, 3)
    x0_bg = torch.full((1, 1, 3), 10.0)
    masks = torch.tensor([[[[1.0, 0.5, 0.0]]], [[[1.0, 0.0, 0.0]]]])  # (P, 1, 1, 3)
    got = pre_average(x0_r, x0_bg, masks)
    # pixel 0: both full -> (2 + 4) / 2, no background; pixel 1: region 1 at 0.5 -> 0.5 * 2 + 0.5 * 10; pixel 2: background
    torch.testing.assert_close(got, torch.tensor([[[3.0, 6.0, 10.0]]]))


def test_bbox_centre_roll_then_unroll_is_the_identity():
    mask = torch.zeros(16, 12)
    mask[1:5, 0:4] = 1  # bbox centre (2.5, 1.5); canvas centre (7.5, 5.5)
    dy, dx = bbox_center_shift(mask)
    assert (dy, dx) == (5, 4)
    rolled = torch.roll(mask, shifts=(dy, dx), dims=(0, 1))
    ys, xs = torch.nonzero(rolled, as_tuple=True)
    assert (int(ys.min()) + int(ys.max())) / 2 == 7.5 and (int(xs.min()) + int(xs.max())) / 2 == 5.5
    x = torch.randn(4, 16, 12)
    back = torch.roll(torch.roll(x, shifts=(dy, dx), dims=(-2, -1)), shifts=(-dy, -dx), dims=(-2, -1))
    assert torch.equal(back, x)
    assert bbox_center_shift(torch.zeros(5, 5)) == (0, 0)


def test_quantized_mask_thresholds_per_noise_level():
    levels = [0.99, 0.9, 0.5]
    m = torch.tensor([[[0.95, 0.7, 0.3, 0.995]]])  # (P=1, 1, 4)
    discrete = quantize_masks(m, levels, "discrete")[:, 0, 0]
    assert discrete.tolist() == [[0, 0, 0, 1], [1, 0, 0, 1], [1, 1, 0, 1]]
    continuous = quantize_masks(m, levels, "continuous")[:, 0, 0]
    want = [[(0.95 - 0.9) / 0.09, 0, 0, 1], [1, (0.7 - 0.5) / 0.4, 0, 1], [1, 1, 0.3 / 0.5, 1]]
    torch.testing.assert_close(continuous, torch.tensor(want))
    # full coverage wherever discrete says so
    assert torch.all(continuous[discrete == 1] == 1)


def test_noise_levels_from_sigmas():
    assert noise_levels([1.0])[0] == pytest.approx(1 / math.sqrt(2))
    assert noise_levels([14.6])[0] == pytest.approx(14.6 / math.sqrt(1 + 14.6 ** 2))


def test_gaussian_blur_keeps_mass_and_spreads():
    m = torch.zeros(1, 41, 41)
    m[0, 20, 20] = 1.0
    b = gaussian_blur(m, 3.0)
    assert float(b.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(b[0, 20, 20]) == pytest.approx(1 / (2 * math.pi * 9), rel=0.05)
    assert torch.equal(gaussian_blur(m, 0.0), m)


def encode(text):
    return torch.full((1, 3, 4), float(len(text)))


def test_denoiser_runs_one_call_with_background_and_region_rows_and_averages():
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    palette = Palette.build([RegionSpec("a dog", left), RegionSpec("a tall cat", 1 - left)], "bg", 16, 16, encode)
    opts = SemanticDrawOptions(bootstrap_steps=0, mask_std=0.0, cover_alpha=1.0)
    state = SemanticDrawState(palette, (4, 4), [3.0, 1.0], opts)
    seen = {}

    def model_call(x, sigma, contexts):
        seen.update(rows=x.shape[0], sigma=sigma.clone(), contexts=contexts)
        return x * 0 + torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1)  # row r predicts the constant r

    x = torch.randn(2, 2, 4, 4)
    out = SemanticDrawDenoiser(model_call, opts)(SlotBatch(x, torch.tensor([3.0, 1.0]), (0, 1), (state, state), torch.zeros_like(x)))
    assert seen["rows"] == 6 and seen["contexts"][0] is None and seen["contexts"][3] is None
    assert torch.equal(seen["contexts"][1], encode("a dog")) and torch.equal(seen["contexts"][2], encode("a tall cat"))
    torch.testing.assert_close(seen["sigma"], torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]))
    # hard halves, no blur: slot 0 = row 1 on the left, row 2 on the right; slot 1 = rows 4 and 5
    assert out[0, :, :, :2].eq(1).all() and out[0, :, :, 2:].eq(2).all()
    assert out[1, :, :, :2].eq(4).all() and out[1, :, :, 2:].eq(5).all()


def test_bootstrap_fills_outside_the_mask_and_rolls_the_region_to_the_centre():
    mask = torch.zeros(16, 16)
    mask[0:4, 0:4] = 1  # top-left corner
    palette = Palette.build([RegionSpec("a dog", mask)], "bg", 16, 16, encode)
    opts = SemanticDrawOptions(bootstrap_steps=1, mask_std=0.0, cover_alpha=1.0)
    state = SemanticDrawState(palette, (8, 8), [2.0], opts)
    assert state.shifts == [[(3, 3)]]
    inputs = {}

    def model_call(x, sigma, contexts):
        inputs["x"] = x.clone()
        return x  # identity: x0 = input

    x = torch.randn(1, 1, 8, 8)
    noise = torch.randn(1, 1, 8, 8)
    fill = torch.full((1, 8, 8), 0.5)
    out = SemanticDrawDenoiser(model_call, opts, bootstrap_fill=fill)(SlotBatch(x, torch.tensor([2.0]), (0,), (state,), noise))
    m = state.masks[0, 0]
    region_in = m * x[0] + (1 - m) * (fill + 2.0 * noise[0])
    torch.testing.assert_close(inputs["x"][1], torch.roll(region_in, shifts=(3, 3), dims=(-2, -1)))
    torch.testing.assert_close(out[0], m * region_in + (1 - m) * x[0])  # unrolled, then pre-averaged with the background


def test_state_refuses_mask_batches():
    palette = Palette.build([RegionSpec("a dog", torch.ones(2, 8, 8))], "bg", 8, 8, encode)
    with pytest.raises(PaletteError, match="one mask set"):
        SemanticDrawState(palette, (1, 1), [1.0])
    with pytest.raises(PaletteError, match="mask type"):
        SemanticDrawOptions(mask_type="fuzzy")
