"""Regional Prompt Palette and Add Region: regions from MASK inputs, encoded with CLIP."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..rcca_core.palette import MAX_REGIONS, Palette, RegionSpec, add_region
from ..rcca_core.palette_state import decode_state
from . import types
from .families import encoder_family


class AddRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCAAddRegion",
            display_name="Add Region",
            category=types.CATEGORY,
            description="Binds a prompt to a mask from any MASK source and appends it to a region chain. "
                        "The chain is immutable: this node returns a new one.",
            inputs=[
                io.Mask.Input("mask", tooltip="Where the prompt applies; soft values give partial coverage. "
                              "A batch of N masks gives each of N latents its own mask."),
                io.String.Input("prompt", multiline=True, default="", tooltip="What this region should show."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Opacity: the region's coverage is strength x mask."),
                io.String.Input("negative", multiline=True, default="", optional=True,
                                tooltip="Optional negative prompt for this region only (used with CFG > 1)."),
                io.String.Input("name", default="", optional=True, tooltip="Label; default 'region N'."),
                io.String.Input("color", default="", optional=True, tooltip="#rrggbb for previews; default from a fixed palette."),
                types.Regions.Input("regions", optional=True, tooltip="The chain so far (leave empty to start one)."),
            ],
            outputs=[types.Regions.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, mask, prompt, strength, negative="", name="", color="", regions=None) -> io.NodeOutput:
        if mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        spec = RegionSpec(prompt=prompt, mask=mask, strength=float(strength), negative=negative or "",
                          name=(name or "").strip(), color=(color or "").strip())
        return io.NodeOutput(add_region(regions or (), spec))


def add_regions(drawn, chained) -> tuple:
    """Drawn regions first (named and coloured by the widget), then the chain from Add Region."""
    out = ()
    for spec in tuple(drawn) + tuple(chained):
        out = add_region(out, spec)
    return out


class RegionalPromptPalette(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCARegionalPromptPalette",
            display_name="Regional Prompt Palette",
            category=types.CATEGORY,
            description="Encodes a background prompt and every region prompt once. Connect 'background' to the "
                        f"sampler's positive input and 'palette' to RCCA Attention Patch. Up to {MAX_REGIONS} regions.",
            inputs=[
                io.Clip.Input("clip"),
                io.String.Input("background", multiline=True, default="",
                                tooltip="Prompt for every pixel no region covers fully: coverage 1 - sum of regions."),
                io.Int.Input("width", default=512, min=64, max=16384, step=8, tooltip="Canvas width in pixels (the image width)."),
                io.Int.Input("height", default=512, min=64, max=16384, step=8, tooltip="Canvas height in pixels (the image height)."),
                types.Regions.Input("regions", optional=True, tooltip="A chain of Add Region nodes."),
                io.String.Input("regions_state", default="", optional=True,
                                tooltip="Regions drawn on this node's canvas (JSON with PNG masks, kept by the drawing "
                                        "widget); they come before the regions input."),
            ],
            outputs=[
                types.Palette.Output(display_name="palette"),
                io.Conditioning.Output(display_name="background"),
                io.Mask.Output(display_name="coverage", tooltip="Background first, then each region, at canvas size."),
            ],
        )

    @classmethod
    def execute(cls, clip, background, width, height, regions=None, regions_state="") -> io.NodeOutput:
        _, _, drawn = decode_state(regions_state)  # validated before any encoding work
        specs = add_regions(drawn, regions or ())
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        background_cond = clip.encode_from_tokens_scheduled(clip.tokenize(background))

        def encode(text: str) -> torch.Tensor:
            if text == background:
                return background_cond[0][0]
            return clip.encode_from_tokens(clip.tokenize(text))

        palette = Palette.build(specs, background, width, height, encode, drawn=len(drawn), encoder=encoder_family(clip))
        return io.NodeOutput(palette, background_cond, palette.coverage_with_background()[0])
