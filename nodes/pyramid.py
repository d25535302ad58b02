"""Mask Pyramid: a palette's coverages at every cross-attention resolution."""

from comfy_api.latest import io

from ..rcca_core.masks import DOWNSAMPLE_MODES, MaskPyramid
from . import types


class MaskPyramidNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCAMaskPyramid",
            display_name="Mask Pyramid",
            category=types.CATEGORY,
            description="Downsamples the palette's masks to each UNet level ahead of sampling. Optional: "
                        "RCCA Attention Patch builds the same levels on first use.",
            inputs=[
                types.Palette.Input("palette"),
                io.Combo.Input("mode", options=list(DOWNSAMPLE_MODES), default="area",
                               tooltip="area keeps soft coverage (use with soft attention); nearest keeps hard edges."),
                io.Latent.Input("latent", optional=True, tooltip="Precompute the levels for this latent's size."),
                io.Int.Input("levels", default=4, min=1, max=8, tooltip="UNet levels to precompute (SD1.5: 4, SDXL: 3)."),
            ],
            outputs=[types.MaskPyramid.Output(display_name="pyramid")],
        )

    @classmethod
    def execute(cls, palette, mode, latent=None, levels=4) -> io.NodeOutput:
        pyramid = MaskPyramid(palette.region_coverage(), mode)
        if latent is not None:
            h, w = latent["samples"].shape[-2:]
            pyramid.precompute(int(h), int(w), levels)
        return io.NodeOutput(pyramid)
