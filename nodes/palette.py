"""Regional Prompt Palette and Add Region: regions from MASK inputs, encoded with CLIP."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..rcca_core.palette import MAX_REGIONS, MAX_WEIGHT, Palette, PaletteError, RegionSpec, add_region
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
                io.Float.Input("weight", default=1.0, min=0.01, max=MAX_WEIGHT, step=0.01, optional=True,
                               tooltip="Scales the region's attention logits (bias log coverage + log weight), not its "
                                       "coverage: where this prompt shares a pixel with others (soft edges, opacity, "
                                       "overlaps) its share grows (2: a 50 % brush reads 2/3 of this prompt) or shrinks "
                                       "(0.5: 1/3). Where it is alone it changes nothing on SD1.5 / SDXL; on SD3 / Flux "
                                       "it also weighs the prompt against the image tokens."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The region's tokens from any conditioning (an encoder, a prompt-scheduling "
                                              "or style node, an embedding) instead of the prompt text; the prompt is "
                                              "then only a label. Its pooled output is not used (the background's is)."),
                types.RegionLoRAs.Input("lora", optional=True,
                                        tooltip="LoRAs for this region only (Region LoRA), applied where it is painted "
                                                "in the same pass. SD1.5 / SDXL."),
            ],
            outputs=[types.Regions.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, mask, prompt, strength, negative="", name="", color="", regions=None, weight=1.0,
                conditioning=None, lora=None) -> io.NodeOutput:
        if mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        label = (name or "").strip()
        context = region_context(conditioning, label or "Add Region") if conditioning is not None else None
        spec = RegionSpec(prompt=prompt if context is None else (prompt.strip() or label or "conditioning"), mask=mask,
                          strength=float(strength), negative=negative or "", name=label, color=(color or "").strip(),
                          weight=float(weight), context=context, loras=tuple(lora or ()))
        return io.NodeOutput(add_region(regions or (), spec))


def region_context(conditioning, what: str) -> torch.Tensor:
    """The token embeddings of a CONDITIONING with one entry; what RCCA cannot honour is refused."""
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        count = len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__
        raise PaletteError(f"{what}: a region takes a conditioning with one entry, this one has {count} (combined, "
                           "scheduled or hooked conditionings); encode the region's prompt with one text encode node")
    tensor, extra = conditioning[0][0], conditioning[0][1]
    refused = {"attention_mask": "an attention mask", "mask": "a mask (ConditioningSetMask)", "hooks": "LoRA hooks",
               "area": "an area (ConditioningSetArea)", "control": "a ControlNet"}
    for key, what_it_is in refused.items():
        if extra.get(key) is not None:
            raise PaletteError(f"{what}: the conditioning carries {what_it_is}, which a region's tokens cannot keep; "
                               "give the region a plain encoded conditioning (the region's mask is its area)")
    if not torch.is_tensor(tensor) or tensor.ndim != 3 or tensor.shape[0] != 1:
        raise PaletteError(f"{what}: the conditioning holds {tuple(getattr(tensor, 'shape', ())) or type(tensor)}, "
                           "expected the token embeddings of one prompt (1, tokens, width)")
    return tensor.detach().float().cpu()


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
