"""Mask pyramid: levels read from activation sizes, area and nearest, odd sizes."""

import pytest
import torch

from rcca_core.masks import MaskPyramid, unet_level_sizes
from rcca_core.palette import PaletteError


def test_unet_levels_round_up_odd_sizes():
    assert unet_level_sizes(65, 47, 4) == [(65, 47), (33, 24), (17, 12), (9, 6)]


def test_area_levels_average_and_background_completes_the_partition():
    cov = torch.zeros(1, 2, 64, 64)
    cov[:, 0, :, :32] = 0.8
    cov[:, 1, :, 16:48] = 0.2
    pyr = MaskPyramid(cov, "area")
    for h, w in unet_level_sizes(8, 8, 4):
        level = pyr.level(h, w)
        assert level.shape == (1, 3, h * w)
        torch.testing.assert_close(level[:, 1:], torch.nn.functional.interpolate(cov, size=(h, w), mode="area").flatten(2))
        torch.testing.assert_close(level.sum(1), torch.ones(1, h * w))  # regions sum <= 1 here: a partition of unity
    assert float(pyr.level(1, 1)[0, 1, 0]) == pytest.approx(0.4)


def test_nearest_keeps_hard_values_and_odd_sizes_work():
    cov = torch.zeros(2, 1, 40, 56)
    cov[0, 0, :20] = 1
    pyr = MaskPyramid(cov, "nearest").precompute(5, 7, 3)
    assert pyr.sizes == [(5, 7), (3, 4), (2, 2)]
    level = pyr.level(5, 7)
    assert set(level.unique().tolist()) <= {0.0, 1.0}
    assert level.shape == (2, 2, 35)
    assert float(level[1, 0].min()) == 1.0  # second sample: no region, all background


def test_levels_are_cached():
    pyr = MaskPyramid(torch.rand(1, 2, 16, 16))
    assert pyr.level(4, 4) is pyr.level(4, 4)


def test_latent_with_another_aspect_ratio_is_refused():
    pyr = MaskPyramid(torch.rand(1, 1, 512, 512))
    pyr.level(64, 63)  # rounding slack is fine
    with pytest.raises(PaletteError, match="does not have the palette canvas's aspect ratio"):
        pyr.level(64, 96)


def test_bad_mode_is_refused():
    with pytest.raises(PaletteError, match="mode must be one of"):
        MaskPyramid(torch.rand(1, 1, 8, 8), "bicubic")
