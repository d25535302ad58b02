"""Stream Batch LCM Sampler, Palette Timeline and SemanticDraw Options.

The sampler runs rcca_core.stream inside ComfyUI's own sampling machinery (a CFGGuider with a
custom sampler function), so model loading, conditioning, CFG and other packs' model patches
work as with KSampler; per-slot palettes travel in transformer_options.
"""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from ..rcca_core.attention import RegionalCrossAttention, cross_attention_layers
from ..rcca_core.palette import PaletteError
from ..rcca_core.semantic_draw import MASK_TYPES, RowContexts, SemanticDrawDenoiser, SemanticDrawOptions, SemanticDrawState
from ..rcca_core.stream import DEFAULT_LCM_INDICES, SlotBatch, StreamBatch, lcm_timesteps, parse_indices
from . import types
from .attention_patch import check_supported

REGION_MODES = ("rcca", "semantic_draw", "none")
CFG_MODES = ("none", "self", "full")
DECODES = ("auto", "vae", "latent2rgb")
COMPILE_MODES = ("eager", "torch.compile")


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


def frame_palettes(palette, timeline, frames: int) -> list:
    """One palette state (one mask set) per output frame. Rule: more states than frames is an
    error; with fewer, the last state holds for the remaining frames."""
    if palette is not None and timeline is not None:
        raise PaletteError("connect either a palette (its mask batch gives one state per frame) or a timeline, not both")
    if timeline is not None:
        states = [p.frame(i) for p, hold in timeline for i in range(p.samples) for _ in range(hold)]
    elif palette is not None:
        states = [palette.frame(i) for i in range(palette.samples)]
    else:
        return []
    if len(states) > frames:
        raise PaletteError(f"the drawing has {len(states)} palette states but the latent batch asks for {frames} frames; "
                           "use an empty latent with a batch size of at least the number of states")
    return states + [states[-1]] * (frames - len(states))


def same_state(a, b) -> bool:
    """Consecutive frames that draw the same thing share one prepared state (and its caches)."""
    return a is b or (a.regions is b.regions and torch.equal(a.region_coverage(), b.region_coverage()))


def stream_sigmas(model, indices_text: str, schedule_steps: int) -> tuple[list[float], float]:
    """Sigmas of the timestep list, and the first noise's scale as ComfyUI's samplers choose it."""
    sampling = model.get_model_object("model_sampling")
    timesteps = lcm_timesteps(parse_indices(indices_text), schedule_steps)
    sigmas = [float(sampling.sigma(torch.tensor(float(t)))) for t in timesteps]
    sigma_max = float(sampling.sigma_max)
    first = sigmas[0]
    max_denoise = math.isclose(sigma_max, first, rel_tol=1e-05) or first > sigma_max
    return sigmas, math.sqrt(1.0 + first ** 2) if max_denoise else first


def latent2rgb(model, samples: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """ComfyUI's linear latent -> RGB preview approximation, upscaled to image size: (F, H, W, 3)."""
    fmt = model.model.latent_format
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("fchw,cr->fhwr", samples.float(), factors)
    if fmt.latent_rgb_factors_bias is not None:
        rgb = rgb + torch.tensor(fmt.latent_rgb_factors_bias, dtype=torch.float32)
    rgb = torch.nn.functional.interpolate(rgb.movedim(-1, 1), scale_factor=scale, mode="bilinear", align_corners=False)
    return ((rgb.movedim(1, -1) + 1.0) / 2.0).clamp(0.0, 1.0)


def stream_model(model, region_mode: str, first_state, compile_mode: str):
    """A clone set up for the region mode: RCCA hooks (kept if already patched), SemanticDraw's row
    contexts, or neither; optionally torch.compile'd."""
    import comfy.samplers  # noqa: F401  (ComfyUI is loaded: this runs inside a node)

    m = model.clone()
    rcca = RegionalCrossAttention.installed_in(m.model_options)
    if region_mode != "rcca" and rcca is not None:
        to = m.model_options["transformer_options"]
        for name in ("attn1_patch", "attn2_patch"):
            to["patches"][name] = [p for p in to["patches"][name] if getattr(p, "__self__", None) is not rcca]
        if rcca.previous_override is not None:
            to["optimized_attention_override"] = rcca.previous_override
        else:
            to.pop("optimized_attention_override", None)
        rcca = None
    if region_mode == "rcca" and rcca is None:
        rcca = RegionalCrossAttention(first_state, cross_attention_layers(m.get_model_object("diffusion_model")),
                                      previous_override=m.model_options.get("transformer_options", {}).get("optimized_attention_override"))
        rcca.install(m.model_options)
    if region_mode == "semantic_draw":
        m.set_model_attn2_patch(RowContexts().attn2_patch)
    if compile_mode == "torch.compile":
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        cuda = m.load_device.type == "cuda"
        set_torch_compile_wrapper(m, backend="inductor", mode="reduce-overhead" if cuda else None, dynamic=False)
    return m, rcca


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
                             tooltip="Frame f uses noise seeded with seed + f."),
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
                types.Palette.Input("palette", optional=True, tooltip="Its mask batch gives one state per frame."),
                types.Timeline.Input("timeline", optional=True, tooltip="Palette states, one per frame."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the frames; a TAESD VAE is the fast path."),
                types.SemanticDrawOptions.Input("semantic_draw", optional=True),
            ],
            outputs=[io.Latent.Output(display_name="frames"), io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, timesteps, schedule_steps, seed, region_mode,
                cfg_mode, cfg, compile, decode, palette=None, timeline=None, vae=None, semantic_draw=None) -> io.NodeOutput:
        import comfy.model_management
        import comfy.samplers
        import latent_preview

        check_supported(model)
        samples = latent_image["samples"]
        if samples.ndim != 4:
            raise PaletteError(f"the stream renders image latents (frames, C, H, W); got a latent of shape {tuple(samples.shape)}")
        frames, channels, h, w = samples.shape
        if channels != model.model.latent_format.latent_channels:
            raise PaletteError(f"the latent has {channels} channels but this model uses "
                               f"{model.model.latent_format.latent_channels}; use an empty latent for this model")
        if decode == "vae" and vae is None:
            raise PaletteError("decode is 'vae' but no VAE is connected; connect one (a TAESD VAE is fastest) or use 'auto'")
        sigmas, initial_scale = stream_sigmas(model, timesteps, schedule_steps)
        states = frame_palettes(palette, timeline, frames)
        if region_mode != "none" and not states:
            raise PaletteError(f"region mode '{region_mode}' needs a palette or a timeline; use region mode 'none' for the prompt alone")
        for state in states[:1]:
            canvas = state.height / state.width
            if abs(h - w * canvas) > 1 + canvas:
                raise PaletteError(f"the latent ({w * 8} x {h * 8} px) does not have the palette canvas's aspect ratio "
                                   f"({state.width} x {state.height})")

        m, rcca = stream_model(model, region_mode, states[0] if states else None, compile)
        conditions = cls._conditions(region_mode, states, rcca, (h, w), sigmas, semantic_draw or SemanticDrawOptions())
        rows_per_tick = len(sigmas) * (1 + max((len(s.regions) for s in states), default=0) if region_mode == "semantic_draw" else 1)
        ticks = frames + len(sigmas) - 1
        preview = latent_preview.prepare_callback(m, ticks)
        out = {}

        def stream_sampler(model_k, x, sigmas_t, extra_args=None, callback=None, disable=None):
            extra_args = extra_args or {}
            base_options = extra_args.get("model_options", {})
            tick = [0]

            def call(x_rows, sigma_rows, transformer_extra):
                comfy.model_management.throw_exception_if_processing_interrupted()
                options = dict(base_options)
                options["transformer_options"] = {**base_options.get("transformer_options", {}), **transformer_extra}
                return model_k(x_rows, sigma_rows, denoise_mask=None, model_options=options, seed=extra_args.get("seed"))

            if region_mode == "semantic_draw":
                fill = cls._white_latent(m, vae, (h, w), x) if vae is not None else None
                inner = SemanticDrawDenoiser(lambda xs, ss, ctx: call(xs, ss, {RowContexts.KEY: tuple(ctx)}),
                                             semantic_draw or SemanticDrawOptions(), fill)
            elif region_mode == "rcca":
                inner = lambda b: call(b.x, b.sigmas, {RegionalCrossAttention.ROWS_KEY: b.conditions})  # noqa: E731
            else:
                inner = lambda b: call(b.x, b.sigmas, {})  # noqa: E731

            def denoiser(batch: SlotBatch) -> torch.Tensor:
                x0 = inner(batch)
                preview(tick[0], x0[:1], batch.x[:1], ticks)
                tick[0] += 1
                return x0

            engine = StreamBatch(denoiser, sigmas, (channels, h, w), seed, initial_scale,
                                 residual_cfg=cfg if cfg_mode == "self" else None, device=x.device, dtype=x.dtype,
                                 fixed_batch=compile == "torch.compile")
            out["frames"] = torch.stack(engine.render(conditions or [None] * frames))
            return x

        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg if cfg_mode == "full" else 1.0)
        rows = torch.zeros((rows_per_tick, channels, h, w))  # sizes ComfyUI's memory estimate for the widest tick
        sigma_t = torch.tensor(sigmas + [0.0])
        with torch.no_grad():  # ComfyUI runs nodes under inference mode; direct callers get the same
            guider.sample(rows, rows, comfy.samplers.KSAMPLER(stream_sampler), sigma_t, disable_pbar=True, seed=seed)

        result = model.model.process_latent_out(out["frames"].float()).cpu()
        if decode == "latent2rgb" or (decode == "auto" and vae is None):
            images = latent2rgb(model, result)
        else:
            images = vae.decode(result)
            if images.ndim == 5:  # video VAEs return (B, T, H, W, C)
                images = images.reshape(-1, *images.shape[-3:])
        return io.NodeOutput({"samples": result}, images)

    @staticmethod
    def _conditions(region_mode, states, rcca, latent_hw, sigmas, sd_options) -> list:
        """One prepared condition per frame; consecutive equal states share one object and its caches."""
        if region_mode == "none":
            return []
        out, previous = [], None
        for state in states:
            if previous is not None and same_state(previous, state):
                out.append(out[-1])
                continue
            if region_mode == "rcca":
                out.append(rcca.prepare(state))
            else:
                out.append(SemanticDrawState(state, latent_hw, sigmas, sd_options))
            previous = state
        return out

    @staticmethod
    def _white_latent(model, vae, latent_hw, like: torch.Tensor) -> torch.Tensor:
        """SemanticDraw's bootstrap fill: a white image, encoded, in the model's latent space."""
        h, w = latent_hw
        white = torch.ones((1, h * 8, w * 8, 3))
        latent = vae.encode(white)
        return model.model.process_latent_in(latent)[0].to(like)
