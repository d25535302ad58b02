"""Stream Batch LCM Sampler, Palette Timeline and SemanticDraw Options.

The sampler runs rcca_core.stream inside ComfyUI's own sampling machinery (a CFGGuider with a
custom sampler function), so model loading, conditioning, CFG and other packs' model patches
work as with KSampler; per-slot palettes travel in transformer_options.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..rcca_core.palette import PaletteError
from ..rcca_core.semantic_draw import MASK_TYPES, SemanticDrawOptions
from ..rcca_core.stream import DEFAULT_LCM_INDICES, NOISE_MODES
from . import types
from .stream_runtime import CFG_MODES, COMPILE_MODES, DECODES, REGION_MODES, StreamRuntime, frame_palettes


class PaletteTimeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCAPaletteTimeline",
            display_name="Palette Timeline",
            category=types.CATEGORY,
            description="A drawing sequence for the Stream Batch LCM Sampler: this palette state lasts 'frames' "
                        "output frames, after the states of the chained timeline.",
            inputs=[
                types.Palette.Input("palette"),
                io.Int.Input("frames", default=1, min=1, max=10000, tooltip="How many output frames this state lasts."),
                types.Timeline.Input("timeline", optional=True, tooltip="Earlier states."),
            ],
            outputs=[types.Timeline.Output(display_name="timeline")],
        )

    @classmethod
    def execute(cls, palette, frames, timeline=None) -> io.NodeOutput:
        return io.NodeOutput(tuple(timeline or ()) + ((palette, int(frames)),))


def noise_input(default: str) -> io.Combo.Input:
    """The `noise` input of the stream nodes (the sampler defaults to per_frame, Live Stream to fixed)."""
    return io.Combo.Input("noise", options=list(NOISE_MODES), default=default,
                          tooltip="per_frame: frame f's noise from seed + f (animations); fixed: every frame starts from "
                                  "the same noise draws, so an unchanged drawing gives the same picture and a stroke "
                                  "changes what it covers.")


def strength_input() -> io.Float.Input:
    """The image-to-image `strength` input of the stream nodes."""
    return io.Float.Input("strength", default=0.6, min=0.01, max=1.0, step=0.01,
                          tooltip="With an image: keep the timesteps t with (t + 1) / 1000 <= strength; the image is "
                                  "noised to the first one (1 = full noise). Unused without an image.")


class SemanticDrawOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = SemanticDrawOptions()
        return io.Schema(
            node_id="RCCASemanticDrawOptions",
            display_name="SemanticDraw Options",
            category=types.CATEGORY,
            description="Settings of the SemanticDraw baseline region mode (defaults from the SemanticDraw code).",
            inputs=[
                io.Int.Input("bootstrap_steps", default=d.bootstrap_steps, min=0, max=50,
                             tooltip="First steps with mask-centering bootstrapping."),
                io.Float.Input("mask_std", default=d.mask_std, min=0.0, max=256.0, step=0.5, tooltip="Mask blur std, canvas pixels."),
                io.Float.Input("mask_strength", default=d.mask_strength, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("mask_type", options=list(MASK_TYPES), default=d.mask_type),
                io.Float.Input("cover_alpha", default=d.cover_alpha, min=0.0, max=1.0, step=0.01,
                               tooltip="A mask keeps this fraction where a later region covers it."),
            ],
            outputs=[types.SemanticDrawOptions.Output(display_name="options")],
        )

    @classmethod
    def execute(cls, bootstrap_steps, mask_std, mask_strength, mask_type, cover_alpha) -> io.NodeOutput:
        return io.NodeOutput(SemanticDrawOptions(bootstrap_steps, mask_std, mask_strength, mask_type, cover_alpha))


class StreamBatchLCMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCAStreamBatchLCMSampler",
            display_name="Stream Batch LCM Sampler",
            category=types.CATEGORY,
            description="Pipelined LCM sampling: one model call per frame serves every step in flight and every region "
                        "prompt. Renders one frame per latent in the batch, each with its own palette state.",
            inputs=[
                io.Model.Input("model", tooltip="An LCM model (or a model with an LCM-LoRA); RCCA-patched or not."),
                io.Conditioning.Input("positive", tooltip="The background prompt (the palette's background output)."),
                io.Conditioning.Input("negative", tooltip="Used by cfg_mode 'full' only."),
                io.Latent.Input("latent_image", tooltip="Empty latent: its batch size is the number of frames."),
                io.String.Input("timesteps", default=", ".join(map(str, DEFAULT_LCM_INDICES)),
                                tooltip="Indices of the LCM schedule, noisy to clean (SemanticDraw: 0, 4, 12, 25, 37)."),
                io.Int.Input("schedule_steps", default=50, min=1, max=1000, tooltip="Length of the schedule the indices refer to."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="per_frame noise: frame f uses seed + f; fixed: every frame uses the seed's draws."),
                io.Combo.Input("region_mode", options=list(REGION_MODES), default="rcca",
                               tooltip="rcca: one row per step (region-constrained cross-attention); semantic_draw: the "
                                       "baseline, one row per step and prompt; none: the positive prompt alone."),
                io.Combo.Input("cfg_mode", options=list(CFG_MODES), default="none",
                               tooltip="none: cfg 1; self: StreamDiffusion's residual CFG (no extra rows); full: CFG with the negative."),
                io.Float.Input("cfg", default=1.5, min=0.0, max=30.0, step=0.1, tooltip="Scale for cfg_mode self / full."),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="eager",
                               tooltip="torch.compile the UNet (CUDA graphs on GPU); eager is the fallback."),
                io.Combo.Input("decode", options=list(DECODES), default="auto",
                               tooltip="auto: the VAE when connected, else latent2rgb (an instant approximation)."),
                noise_input("per_frame"),
                strength_input(),
                types.Palette.Input("palette", optional=True, tooltip="Its mask batch gives one state per frame."),
                types.Timeline.Input("timeline", optional=True, tooltip="Palette states, one per frame."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the frames and encodes the image; a TAESD VAE is the fast path."),
                types.SemanticDrawOptions.Input("semantic_draw", optional=True),
                io.Image.Input("image", optional=True,
                               tooltip="Image-to-image: frames start from this image (encoded with the vae) noised to the "
                                       "first timestep strength keeps. One image, or one per frame; the frames' size."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpaint: 1 = repaint, 0 = keep the image's pixels (as KSampler's noise mask). "
                                      "The image's size; one mask, or one per frame."),
            ],
            outputs=[io.Latent.Output(display_name="frames"), io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, timesteps, schedule_steps, seed, region_mode,
                cfg_mode, cfg, compile, decode, noise="per_frame", strength=0.6, palette=None, timeline=None, vae=None,
                semantic_draw=None, image=None, mask=None) -> io.NodeOutput:
        samples = latent_image["samples"]
        if samples.ndim != 4:
            raise PaletteError(f"the stream renders image latents (frames, C, H, W); got a latent of shape {tuple(samples.shape)}")
        frames = samples.shape[0]
        states = frame_palettes(palette, timeline, frames)
        runtime = StreamRuntime(model, positive, negative, tuple(samples.shape[1:]), timesteps, schedule_steps, seed,
                                region_mode, cfg_mode, cfg, compile, decode, states, vae, semantic_draw,
                                noise=noise, image=image, strength=strength, mask=mask, frames=frames)
        conditions = runtime.conditions(states) if region_mode != "none" else [None] * frames
        preview = runtime.preview(frames + runtime.depth - 1)
        out = {}

        def render(engine):
            out["frames"] = torch.stack(engine.render(conditions, sources=[runtime.source(f) for f in range(frames)]))

        runtime.run(render, on_tick=preview)
        result = runtime.latent_out(out["frames"])
        return io.NodeOutput({"samples": result}, runtime.decode(result))
