"""ComfyUI glue for rcca_core.stream, shared by the Stream Batch LCM Sampler and Live Stream.

`StreamRuntime` validates the settings, prepares a model clone for the region mode (RCCA hooks,
SemanticDraw's row contexts, or neither; optionally compiled) and runs a body inside ComfyUI's
own sampling machinery: a CFGGuider with a custom sampler function, so model loading,
conditioning, CFG and other packs' model patches work as with KSampler. Per-slot palette states
travel in transformer_options. The engine outlives a run, so a live session can pause (leave
the sampler, letting ComfyUI run queued prompts) and resume with its frames in flight.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..rcca_core.attention import RegionalCrossAttention, cross_attention_layers
from ..rcca_core.masks import check_latent_aspect
from ..rcca_core.palette import PaletteError
from ..rcca_core.semantic_draw import RowContexts, SemanticDrawDenoiser, SemanticDrawOptions, SemanticDrawState
from ..rcca_core.stream import (NOISE_MODES, ImageSource, SlotBatch, StreamBatch, check_strength, lcm_timesteps,
                                parse_indices, strength_timesteps)
from .attention_patch import check_supported, install_rcca, uninstall_rcca
from .region_lora import regional_lora

REGION_MODES = ("rcca", "semantic_draw", "none")
CFG_MODES = ("none", "self", "full")
DECODES = ("auto", "vae", "latent2rgb")
COMPILE_MODES = ("eager", "torch.compile")


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


def stream_sigmas(model, indices_text: str, schedule_steps: int, strength: float | None = None) -> tuple[list[float], float]:
    """Sigmas of the timestep list (image-to-image: those `strength` keeps), and the first noise's
    scale as ComfyUI's samplers choose it."""
    sampling = model.get_model_object("model_sampling")
    timesteps = lcm_timesteps(parse_indices(indices_text), schedule_steps)
    if strength is not None:
        timesteps = strength_timesteps(timesteps, strength)
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


class StreamRuntime:
    # torch.compile settings of the `compile` option. The RCCA hooks trace without a graph break (their
    # inputs are precomputed per model call, padded to a token bucket); fullgraph stays off because
    # ComfyUI's CPU attention (sub-quadratic) reads free memory through psutil, which dynamo cannot trace.
    compile_backend: Any = "inductor"
    compile_fullgraph = False

    def __init__(self, model, positive, negative, latent_shape: Sequence[int], timesteps: str, schedule_steps: int,
                 seed: int, region_mode: str, cfg_mode: str, cfg: float, compile: str, decode: str,
                 states: Sequence, vae=None, semantic_draw: SemanticDrawOptions | None = None,
                 node: str = "Stream Batch LCM Sampler", noise: str = "per_frame", image=None, strength: float = 1.0,
                 mask=None, frames: int | None = None) -> None:
        """frames: how many frames the image and mask batches may cover (None: one image, live)."""
        import comfy.samplers

        check_supported(model, node)
        if noise not in NOISE_MODES:
            raise PaletteError(f"{node}: noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
        check_strength(strength)
        channels, h, w = (int(v) for v in latent_shape)
        if channels != model.model.latent_format.latent_channels:
            raise PaletteError(f"the latent has {channels} channels but this model uses "
                               f"{model.model.latent_format.latent_channels}; use an empty latent for this model")
        if decode == "vae" and vae is None:
            raise PaletteError("decode is 'vae' but no VAE is connected; connect one (a TAESD VAE is fastest) or use 'auto'")
        if region_mode != "none" and not states:
            raise PaletteError(f"region mode '{region_mode}' needs a palette or a timeline; use region mode 'none' for the prompt alone")
        for state in states[:1]:
            check_latent_aspect(state.width, state.height, w * 8, h * 8, node)
        self.model = model
        self.latent_shape = (channels, h, w)
        self.noise = noise
        self.node, self.strength, self._mask_in = node, strength, mask
        self._timesteps, self._schedule_steps = timesteps, schedule_steps
        self.sigmas, self.initial_scale = stream_sigmas(model, timesteps, schedule_steps,
                                                        strength if image is not None else None)
        self._image_latents, self._image_masks = self._encode_image(image, mask, vae, frames, node)
        self._sources: list[ImageSource] | None = None
        self.seed = seed
        self.region_mode = region_mode
        self.cfg_mode, self.cfg = cfg_mode, cfg
        self.compiled = compile == "torch.compile"
        self.decode_mode = decode
        self.vae = vae
        self.semantic_draw = semantic_draw or SemanticDrawOptions()
        self.patched, self.rcca = self._prepare_model(states[0] if states else None)
        self.guider = comfy.samplers.CFGGuider(self.patched)
        self.guider.set_conds(positive, negative)
        self.guider.set_cfg(cfg if cfg_mode == "full" else 1.0)
        self._widest = 1 + max((len(s.regions) for s in states), default=0) if region_mode == "semantic_draw" else 1
        self._call: Callable | None = None
        self._first_frame = 0
        self._semantic_draw: SemanticDrawDenoiser | None = None
        self._on_tick: Callable | None = None
        self.engine: StreamBatch | None = None

    @property
    def depth(self) -> int:
        return len(self.sigmas)

    def _encode_image(self, image, mask, vae, frames: int | None, node: str):
        """Image-to-image: check the image and mask against the frames, before any sampling;
        encode the image with the VAE into the model's space; bring the mask to latent size
        the way ComfyUI's samplers do (bilinear, one copy per channel)."""
        if image is None:
            if mask is not None:
                raise PaletteError(f"{node}: a mask says which pixels of an image to repaint, but no image is connected; "
                                   "connect the image (with a VAE) or remove the mask")
            return None, None
        if vae is None:
            raise PaletteError(f"{node}: image-to-image encodes the image with the VAE, but no VAE is connected; "
                               "connect the checkpoint's VAE (or a TAESD VAE)")
        channels, h, w = self.latent_shape
        width, height = w * 8, h * 8
        allowed = "1" if frames is None else f"1 (every frame) or {frames} (one per frame)"
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise PaletteError(f"{node}: the image must be an IMAGE (batch, height, width, 3), got "
                               f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
        if tuple(image.shape[1:3]) != (height, width):
            raise PaletteError(f"{node}: the image is {image.shape[2]} x {image.shape[1]} px but the frames are {width} x "
                               f"{height} px; scale or crop the image to {width} x {height} (e.g. ImageScale) or make the "
                               "frames the image's size")
        if image.shape[0] not in {1, frames or 1}:
            raise PaletteError(f"{node}: the image batch has {image.shape[0]} images; give {allowed}")
        if mask is not None:
            if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
                raise PaletteError(f"{node}: the mask must be a MASK (batch, height, width), got "
                                   f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
            mask = mask.reshape(-1, *mask.shape[-2:]).float()
            if tuple(mask.shape[1:]) != (height, width):
                raise PaletteError(f"{node}: the mask is {mask.shape[2]} x {mask.shape[1]} px but the image is {width} x "
                                   f"{height} px; give a mask of the image's size")
            if mask.shape[0] not in {1, frames or 1}:
                raise PaletteError(f"{node}: the mask batch has {mask.shape[0]} masks; give {allowed}")
            if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
                raise PaletteError(f"{node}: mask values must be in [0, 1] (1 = repaint, 0 = keep the image)")
        latent = vae.encode(image[..., :3])
        if tuple(latent.shape[1:]) != (channels, h, w):
            raise PaletteError(f"{node}: the VAE encodes the image to a latent of shape {tuple(latent.shape[1:])} but the "
                               f"model's frames are {(channels, h, w)}; use the VAE that belongs to the model")
        latent = self.model.model.process_latent_in(latent.float()).cpu()
        if mask is not None:
            import comfy.sampler_helpers

            mask = comfy.sampler_helpers.prepare_mask(mask, (mask.shape[0], channels, h, w), "cpu")
        return latent, mask

    def set_image(self, image) -> bool:
        """Live: draw over `image` from now on (None: text-to-image again), with the node's strength
        and mask. Frames in flight keep theirs when the timesteps stay; when they change (strength
        keeps fewer than the full list) the pipe restarts, frame numbers continuing. Returns whether
        it restarted. Call outside run(): the VAE may need loading."""
        sigmas, scale = stream_sigmas(self.model, self._timesteps, self._schedule_steps,
                                      self.strength if image is not None else None)
        latents, masks = self._encode_image(image, self._mask_in if image is not None else None, self.vae, None, self.node)
        self._image_latents, self._image_masks, self._sources = latents, masks, None
        restart = sigmas != self.sigmas
        if restart:
            self.sigmas, self.initial_scale = sigmas, scale
            if self.engine is not None:
                self._first_frame = self.engine.next_frame
            self.engine = None  # rebuilt by the next run(), with its sources
        elif self.engine is not None:
            self._make_sources(torch.empty(0, device=self.engine.device, dtype=self.engine.dtype))
        return restart

    def source(self, frame: int) -> ImageSource | None:
        """Frame `frame`'s image (None without image-to-image); valid inside run()."""
        if self._sources is None:
            return None
        return self._sources[min(frame, len(self._sources) - 1)]

    def _make_sources(self, like: torch.Tensor) -> None:
        if self._image_latents is None:
            return
        lat, masks = self._image_latents, self._image_masks
        n = max(lat.shape[0], 1 if masks is None else masks.shape[0])
        self._sources = [ImageSource(lat[min(i, lat.shape[0] - 1)].to(like),
                                     None if masks is None else masks[min(i, masks.shape[0] - 1)].to(like))
                         for i in range(n)]

    def _prepare_model(self, first_state):
        m = self.model.clone()
        rcca = RegionalCrossAttention.installed_in(m.model_options)
        if self.region_mode != "rcca" and rcca is not None:
            uninstall_rcca(m, rcca)
            rcca = None
        if self.region_mode == "rcca" and rcca is None:
            previous = m.model_options.get("transformer_options", {}).get("optimized_attention_override")
            layers = cross_attention_layers(m.get_model_object("diffusion_model"))
            rcca = RegionalCrossAttention(first_state, layers, previous_override=previous, lora=regional_lora(m, layers))
            install_rcca(m, rcca)
        if self.region_mode == "semantic_draw":
            m.set_model_attn2_patch(RowContexts().attn2_patch)
        if self.compiled:
            from comfy_api.torch_helpers import set_torch_compile_wrapper

            cuda = m.load_device.type == "cuda"
            set_torch_compile_wrapper(m, backend=self.compile_backend, mode="reduce-overhead" if cuda else None,
                                      fullgraph=self.compile_fullgraph, dynamic=False)
        return m, rcca

    def condition(self, state) -> Any:
        """A palette state prepared for the region mode (None in mode 'none')."""
        if self.region_mode == "rcca":
            return self.rcca.prepare(state)
        if self.region_mode == "semantic_draw":
            return SemanticDrawState(state, self.latent_shape[1:], self.sigmas, self.semantic_draw)
        return None

    def conditions(self, states: Sequence) -> list:
        """One prepared condition per frame; consecutive equal states share one object and its caches."""
        out, previous = [], None
        for state in states:
            if previous is not None and same_state(previous, state):
                out.append(out[-1])
                continue
            out.append(self.condition(state))
            previous = state
        return out

    def preview(self, ticks: int) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        """ComfyUI's progress bar and latent previews, one step per tick."""
        import latent_preview

        callback = latent_preview.prepare_callback(self.patched, ticks)
        return lambda tick, x0, x: callback(min(tick, ticks - 1), x0, x, ticks)

    def _denoise(self, batch: SlotBatch) -> torch.Tensor:
        if self._call is None:
            raise RuntimeError("the stream ticked outside StreamRuntime.run()")
        if self.region_mode == "semantic_draw":
            x0 = self._semantic_draw(batch)
        elif self.region_mode == "rcca":
            x0 = self._call(batch.x, batch.sigmas, {RegionalCrossAttention.ROWS_KEY: batch.conditions})
        else:
            x0 = self._call(batch.x, batch.sigmas, {})
        if self._on_tick is not None:
            self._on_tick(self._ticks, x0[:1], batch.x[:1])
        self._ticks += 1
        return x0

    def run(self, body: Callable[[StreamBatch], None], on_tick: Callable | None = None) -> None:
        """body(engine) inside ComfyUI's sampling context: models loaded, conditioning processed."""
        import comfy.model_management
        import comfy.samplers

        def sampler(model_k, x, sigmas_t, extra_args=None, callback=None, disable=None):
            extra_args = extra_args or {}
            base = extra_args.get("model_options", {})

            def call(x_rows, sigma_rows, transformer_extra):
                comfy.model_management.throw_exception_if_processing_interrupted()
                options = dict(base)
                options["transformer_options"] = {**base.get("transformer_options", {}), **transformer_extra}
                return model_k(x_rows, sigma_rows, denoise_mask=None, model_options=options, seed=extra_args.get("seed"))

            if self.engine is None:
                self.engine = StreamBatch(self._denoise, self.sigmas, self.latent_shape, self.seed, self.initial_scale,
                                          residual_cfg=self.cfg if self.cfg_mode == "self" else None,
                                          device=x.device, dtype=x.dtype, fixed_batch=self.compiled, noise=self.noise,
                                          first_frame=self._first_frame)
                self._make_sources(x)
                if self.region_mode == "semantic_draw":
                    fill = self._white_latent().to(x) if self.vae is not None else None
                    self._semantic_draw = SemanticDrawDenoiser(
                        lambda xs, ss, ctx: self._call(xs, ss, {RowContexts.KEY: tuple(ctx)}), self.semantic_draw, fill)
            self._call, self._on_tick, self._ticks = call, on_tick, 0
            try:
                body(self.engine)
            finally:
                self._call = None
            return x

        rows = torch.zeros((self.depth * self._widest, *self.latent_shape))  # sizes ComfyUI's memory estimate
        with torch.no_grad():  # ComfyUI runs nodes under inference mode; other threads and direct callers get the same
            self.guider.sample(rows, rows, comfy.samplers.KSAMPLER(sampler), torch.tensor(self.sigmas + [0.0]),
                               disable_pbar=True, seed=self.seed)

    def latent_out(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space x0 -> a LATENT tensor (the VAE's scale), on the CPU."""
        return self.model.model.process_latent_out(x0.float()).cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """LATENT frames -> IMAGE (F, H, W, 3) with the VAE, or latent2rgb."""
        if self.decode_mode == "latent2rgb" or (self.decode_mode == "auto" and self.vae is None):
            return latent2rgb(self.model, latents)
        images = self.vae.decode(latents)
        if images.ndim == 5:  # video VAEs return (B, T, H, W, C)
            images = images.reshape(-1, *images.shape[-3:])
        return images

    def _white_latent(self) -> torch.Tensor:
        """SemanticDraw's bootstrap fill: a white image, encoded, in the model's latent space."""
        h, w = self.latent_shape[1:]
        latent = self.vae.encode(torch.ones((1, h * 8, w * 8, 3)))
        return self.model.model.process_latent_in(latent)[0]
