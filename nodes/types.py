"""The pack's own socket types. Values are rcca_core objects, immutable once made."""

from comfy_api.latest import io

Regions = io.Custom("RCCA_REGIONS")  # tuple[RegionSpec, ...], a chain built by Add Region
Palette = io.Custom("RCCA_PALETTE")  # rcca_core.Palette: encoded prompts + coverages
MaskPyramid = io.Custom("RCCA_MASK_PYRAMID")  # rcca_core.MaskPyramid
Timeline = io.Custom("RCCA_PALETTE_TIMELINE")  # tuple[(Palette, frames), ...], a drawing sequence
RegionLoRAs = io.Custom("RCCA_REGION_LORA")  # tuple[rcca_core.region_lora.RegionLoRA, ...], from Region LoRA
SemanticDrawOptions = io.Custom("RCCA_SEMANTIC_DRAW_OPTIONS")  # rcca_core.semantic_draw.SemanticDrawOptions

CATEGORY = "conditioning/rcca_palette"
