"""rcca-palette core: regional prompt palettes, mask pyramids and region-constrained
cross-attention (RCCA) in plain torch. Never imports ComfyUI, so it is testable alone."""

from .palette import MAX_REGIONS, Palette, PaletteError, Region, RegionSpec, resize_mask_to_canvas
from .masks import MaskPyramid
from .attention import RCCAOptions, RegionalCrossAttention, region_bias

__all__ = [
    "MAX_REGIONS", "Palette", "PaletteError", "Region", "RegionSpec",
    "MaskPyramid", "resize_mask_to_canvas",
    "RCCAOptions", "RegionalCrossAttention", "region_bias",
]
