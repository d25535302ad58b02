"""Mask pyramid: region coverages downsampled to every cross-attention resolution.

The resolutions are read from the model's activations at run time (a UNet level of an odd
latent rounds up: 65 -> 33 -> 17 -> 9), so any latent size works; `precompute` fills the
levels of a known latent size ahead of time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import PaletteError

DOWNSAMPLE_MODES = ("area", "nearest")


def check_latent_aspect(canvas_width: int, canvas_height: int, width_px: int, height_px: int,
                        node: str, cell_px: int = 8) -> None:
    """A latent must have the canvas's aspect ratio; one latent cell of slack per axis, scaled
    by the ratio, absorbs the rounding of odd sizes. Sizes in pixels, so every sampler says the same."""
    ratio = canvas_width / canvas_height
    if abs(width_px - height_px * ratio) > cell_px * (1 + ratio) or abs(height_px - width_px / ratio) > cell_px * (1 + 1 / ratio):
        raise PaletteError(
            f"{node}: the latent ({width_px} x {height_px} px) does not have the palette canvas's aspect ratio "
            f"({canvas_width} x {canvas_height} px); use an empty latent of the canvas size (or a multiple of it)")


def unet_level_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Spatial sizes of a UNet's levels for a latent: each stride-2 conv rounds up."""
    sizes = [(height, width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


class MaskPyramid:
    """Region coverages (N, P, H, W) at canvas size -> (N, 1 + P, h * w) per level, background first.

    The background at each level is clip(1 - sum of the downsampled regions, 0, 1), so soft
    masks that sum to at most one stay a partition of unity at every level.
    """

    def __init__(self, region_coverage: torch.Tensor, mode: str = "area") -> None:
        if mode not in DOWNSAMPLE_MODES:
            raise PaletteError(f"mask pyramid mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")
        if region_coverage.ndim != 4:
            raise PaletteError(f"region coverage must be (N, P, H, W), got {tuple(region_coverage.shape)}")
        self.mode = mode
        self._coverage = region_coverage.float()
        self._levels: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(height, width) of the canvas in pixels."""
        return tuple(self._coverage.shape[-2:])

    @property
    def samples(self) -> int:
        return int(self._coverage.shape[0])

    @property
    def regions(self) -> int:
        return int(self._coverage.shape[1])

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return sorted(self._levels, reverse=True)

    def check_aspect(self, h: int, w: int) -> None:
        """A level must have the canvas's aspect ratio. Samplers check the latent in pixels before
        they start (check_latent_aspect); this catches a layer another patch resized."""
        H, W = self.canvas_size
        if abs(w - h * W / H) > 1.0 + W / H or abs(h - w * H / W) > 1.0 + H / W:
            raise PaletteError(
                f"RCCA: a cross-attention layer of {w} x {h} cells does not have the palette canvas's aspect ratio "
                f"({W} x {H} px); use an empty latent of the canvas size (or a multiple of it)")

    def level(self, h: int, w: int) -> torch.Tensor:
        """(N, 1 + P, h * w) float32 coverages at an h x w attention layer."""
        key = (int(h), int(w))
        cached = self._levels.get(key)
        if cached is None:
            self.check_aspect(*key)
            regions = F.interpolate(self._coverage, size=key, mode=self.mode)
            background = (1.0 - regions.sum(dim=1, keepdim=True)).clamp(0.0, 1.0)
            cached = torch.cat([background, regions], dim=1).flatten(2).contiguous()
            self._levels[key] = cached
        return cached

    def precompute(self, latent_height: int, latent_width: int, levels: int = 4) -> "MaskPyramid":
        """Fill the levels of a UNet with `levels` resolutions for a latent of this size."""
        for h, w in unet_level_sizes(latent_height, latent_width, levels):
            self.level(h, w)
        return self
