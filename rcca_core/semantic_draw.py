"""SemanticDraw (Lee et al., CVPR 2025) as a region mode of the stream batch: the baseline.

Region control through the latents. Every slot runs the background prompt and each region
prompt on the whole canvas (batch S x (1 + P)); the x0 predictions are averaged under the
slot's quantized masks (latent pre-averaging) and blended with the background's, and the
stream adds noise after averaging. During the first `bootstrap_steps` steps each region's
latent sees a noised fill (white, or a given latent) outside its mask and is rolled so its
mask's bounding-box centre sits at the canvas centre, then rolled back (mask-centering
bootstrapping). Masks are blurred, scaled by a strength and quantized per noise level.

Defaults follow the SemanticDraw code (StreamMultiDiffusion): blur std 8 px, strength 1,
continuous masks, 1 bootstrap step, cover alpha 0.3. Differences, by design: the background
is a prompt (the sampler's positive), not an image latent; prompt strength (lerp of region and
background embeddings) is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .palette import Palette, PaletteError
from .stream import SlotBatch

MASK_TYPES = ("continuous", "discrete")


@dataclass(frozen=True)
class SemanticDrawOptions:
    bootstrap_steps: int = 1
    mask_std: float = 8.0  # Gaussian blur std, canvas pixels
    mask_strength: float = 1.0
    mask_type: str = "continuous"
    cover_alpha: float = 0.3  # a mask keeps this fraction where a later region covers it

    def __post_init__(self) -> None:
        if self.mask_type not in MASK_TYPES:
            raise PaletteError(f"mask type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        if self.bootstrap_steps < 0 or self.mask_std < 0 or not 0 <= self.mask_strength <= 1 or not 0 <= self.cover_alpha <= 1:
            raise PaletteError("SemanticDraw options: bootstrap_steps >= 0, mask_std >= 0, mask_strength and "
                               f"cover_alpha in [0, 1]; got {self}")


def noise_levels(sigmas: Sequence[float]) -> list[float]:
    """k-diffusion sigma -> DDPM noise level sqrt(1 - alpha_bar) = sigma / sqrt(1 + sigma^2)."""
    return [float(s) / math.sqrt(1.0 + float(s) ** 2) for s in sigmas]


def gaussian_blur(masks: torch.Tensor, std: float) -> torch.Tensor:
    """Separable Gaussian blur of (P, H, W) masks, edges replicated; std in pixels."""
    if std <= 0:
        return masks
    radius = max(1, int(math.ceil(3 * std)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / std) ** 2)
    kernel = (kernel / kernel.sum()).to(masks.dtype)
    out = masks.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def quantize_masks(masks: torch.Tensor, levels: Sequence[float], mask_type: str = "continuous") -> torch.Tensor:
    """(P, H, W) soft masks -> (S, P, H, W), one per noise level nu_1 > ... > nu_S.

    discrete: m > nu_s. continuous: clip((m - nu_{s+1}) / (nu_s - nu_{s+1}), 0, 1), nu_{S+1} = 0:
    the same full coverage as discrete, fading to 0 at the next level. Low noise -> larger masks.
    """
    nu = torch.tensor(list(levels), dtype=masks.dtype).view(-1, 1, 1, 1)
    nu_next = torch.cat([nu[1:], torch.zeros_like(nu[:1])])
    m = masks.unsqueeze(0)
    if mask_type == "discrete":
        return (m > nu).to(masks.dtype)
    return ((m - nu_next) / (nu - nu_next)).clamp(0.0, 1.0)


def bbox_center_shift(mask: torch.Tensor) -> tuple[int, int]:
    """(dy, dx) that rolls the bounding box of mask > 0 to the centre of the canvas; (0, 0) if empty."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if ys.numel() == 0:
        return 0, 0
    h, w = mask.shape
    cy = (int(ys.min()) + int(ys.max())) / 2
    cx = (int(xs.min()) + int(xs.max())) / 2
    return int(round((h - 1) / 2 - cy)), int(round((w - 1) / 2 - cx))


def pre_average(x0_regions: torch.Tensor, x0_background: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Latent pre-averaging: x0 = (1 - bg) * sum_r m_r x0_r / sum_r m_r + bg * x0_bg, bg = clip(1 - sum_r m_r, 0, 1).

    x0_regions (P, C, h, w), x0_background (C, h, w), masks (P, 1, h, w) or (P, h, w)."""
    if masks.ndim == 3:
        masks = masks.unsqueeze(1)
    counts = masks.sum(dim=0)
    weighted = (masks * x0_regions).sum(dim=0)
    average = torch.where(counts > 0, weighted / counts.clamp_min(1e-8), torch.zeros_like(weighted))
    background = (1.0 - counts).clamp(0.0, 1.0)
    return (1.0 - background) * average + background * x0_background


class SemanticDrawState:
    """One palette prepared for SemanticDraw at a latent size and a stream schedule: quantized
    masks per step and the bootstrap roll of each region, computed once on the CPU (no host
    sync during the ticks)."""

    def __init__(self, palette: Palette, latent_hw: tuple[int, int], sigmas: Sequence[float],
                 options: SemanticDrawOptions = SemanticDrawOptions()) -> None:
        if palette.samples != 1:
            raise PaletteError("a SemanticDraw palette state carries one mask set; split mask batches into frames first")
        masks = palette.region_coverage()[0].float()  # (P, H, W): strength x mask
        if options.cover_alpha < 1:
            covered = torch.flip(torch.cumsum(torch.flip(masks, [0]), 0), [0]) - masks  # coverage by later regions
            masks = torch.where(covered > 0, masks * options.cover_alpha, masks)
        masks = gaussian_blur(masks, options.mask_std) * options.mask_strength
        quantized = quantize_masks(masks, noise_levels(sigmas), options.mask_type)  # (S, P, H, W)
        self.masks = F.interpolate(quantized, size=tuple(latent_hw), mode="nearest")  # (S, P, h, w)
        self.shifts = [[bbox_center_shift(self.masks[s, r]) for r in range(self.masks.shape[1])]
                       for s in range(min(options.bootstrap_steps, len(sigmas)))]
        self.contexts = [r.context for r in palette.regions]
        self.palette = palette
        self._on_device: dict[tuple, torch.Tensor] = {}

    @property
    def regions(self) -> int:
        return len(self.contexts)

    def step_masks(self, step: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(P, 1, h, w) quantized masks of one step."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = self.masks.to(device=device, dtype=dtype).unsqueeze(2)
        return self._on_device[key][step]


ModelCall = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]
"""(x rows, sigma rows, per-row context or None for the sampler's positive) -> x0 rows."""


class SemanticDrawDenoiser:
    """A stream Denoiser: slot conditions are SemanticDrawState; one model call of sum(1 + P_i) rows."""

    def __init__(self, model_call: ModelCall, options: SemanticDrawOptions = SemanticDrawOptions(),
                 bootstrap_fill: torch.Tensor | None = None) -> None:
        self.model_call = model_call
        self.options = options
        self.bootstrap_fill = bootstrap_fill  # (C, h, w) model-space latent of white; zeros if None

    def __call__(self, batch: SlotBatch) -> torch.Tensor:
        xs, sigmas, contexts, plan = [], [], [], []
        for i, (state, step) in enumerate(zip(batch.conditions, batch.steps)):
            x, sigma = batch.x[i], batch.sigmas[i]
            bootstrap = step < self.options.bootstrap_steps
            masks = state.step_masks(step, x.device, x.dtype)
            first = len(xs)
            xs.append(x)
            contexts.append(None)
            if bootstrap:
                fill = self.bootstrap_fill if self.bootstrap_fill is not None else torch.zeros_like(x)
                noised_fill = fill.to(x) + sigma.to(x.dtype) * batch.noise[i]
            for r in range(state.regions):
                if bootstrap:
                    dy, dx = state.shifts[step][r]
                    xin = masks[r] * x + (1.0 - masks[r]) * noised_fill
                    xs.append(torch.roll(xin, shifts=(dy, dx), dims=(-2, -1)))
                else:
                    xs.append(x)
                contexts.append(state.contexts[r])
            sigmas.append(sigma.expand(1 + state.regions))
            plan.append((first, state, step, masks, bootstrap))
        x0_rows = self.model_call(torch.stack(xs), torch.cat(sigmas), contexts)
        out = []
        for first, state, step, masks, bootstrap in plan:
            regions = x0_rows[first + 1:first + 1 + state.regions]
            if bootstrap:
                regions = torch.stack([torch.roll(regions[r], shifts=(-dy, -dx), dims=(-2, -1))
                                       for r, (dy, dx) in enumerate(state.shifts[step])])
            out.append(pre_average(regions, x0_rows[first], masks))
        return torch.stack(out)


class RowContexts:
    """An attn2_patch (ComfyUI protocol) for SemanticDraw's rows: cond row i of every cond chunk
    attends to transformer_options["rcca_row_contexts"][i] (None keeps its own context); uncond
    rows keep theirs. Lengths that differ are repeated to their least common multiple, as
    ComfyUI batches conditionings of different lengths."""

    KEY = "rcca_row_contexts"

    def __init__(self) -> None:
        self._last: tuple | None = None

    def __deepcopy__(self, memo):
        return self  # stateless but for a per-call cache; shared across model clones

    def attn2_patch(self, n, context, value, extra_options):
        rows = extra_options.get(self.KEY)
        if rows is None:
            return n, context, value
        if self._last is not None and self._last[0] is rows and self._last[1] is context:
            return n, self._last[2], self._last[2]
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        per = context.shape[0] // len(cond_or_uncond)
        if len(rows) != per:
            raise PaletteError(f"SemanticDraw: {len(rows)} row contexts for {per} rows per chunk")
        pieces = []
        for c, kind in enumerate(cond_or_uncond):
            own = context[c * per:(c + 1) * per]
            if kind == 1:
                pieces.extend(own.split(1))
            else:
                pieces.extend(own[i:i + 1] if r is None else r.to(own) for i, r in enumerate(rows))
        length = math.lcm(*(p.shape[1] for p in pieces))
        merged = torch.cat([p.repeat(1, length // p.shape[1], 1) for p in pieces])
        self._last = (rows, context, merged)
        return n, merged, merged
