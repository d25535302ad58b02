"""The regional prompt palette: regions (prompt + soft mask) over a canvas, plus a background.

A palette is immutable. Nodes that add regions return a new chain, so every edit is a graph
edge and a saved workflow is complete. `RegionSpec` is what a user gives (text and mask);
`Region` is the same after the prompts are encoded; `Palette` is the encoded whole.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import PaletteError

MAX_REGIONS = 16
"""More regions than this rarely help a drawing and make the concatenated context long."""
MAX_WEIGHT = 10.0
"""Region weights go up to ComfyUI's own conditioning strength limit."""

DEFAULT_COLORS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
    "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#000075",
)
_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


def resize_mask_to_canvas(mask: torch.Tensor, width: int, height: int, what: str = "mask") -> torch.Tensor:
    """(N, H, W) -> (N, height, width).

    Rule: a mask of the canvas size is used as is; a mask with the canvas's aspect ratio
    (within one pixel) is resized with antialiased bilinear filtering; any other size is an
    error, since stretching would move the region.
    """
    h, w = mask.shape[-2:]
    if (h, w) == (height, width):
        return mask
    if abs(w * height / h - width) > 1.0 or abs(h * width / w - height) > 1.0:
        raise PaletteError(
            f"{what}: mask is {w} x {h} but the canvas is {width} x {height}; masks must match the canvas size "
            "or at least its aspect ratio (then they are resized); crop or resize the mask, or change the canvas")
    out = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return out.squeeze(1).clamp(0.0, 1.0)


def check_mask_values(mask: torch.Tensor, what: str) -> None:
    """Masks are soft coverages: finite floats in [0, 1]."""
    if not torch.is_floating_point(mask):
        raise PaletteError(f"{what}: mask must be a float tensor with values in [0, 1], got dtype {mask.dtype}")
    if mask.numel() == 0:
        raise PaletteError(f"{what}: mask is empty (shape {tuple(mask.shape)})")
    if not bool(torch.isfinite(mask).all()):
        raise PaletteError(f"{what}: mask contains NaN or infinite values; masks must be finite values in [0, 1]")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < 0.0 or hi > 1.0:
        raise PaletteError(f"{what}: mask values must lie in [0, 1], got min {lo:.4g} and max {hi:.4g}")


@dataclass(frozen=True, eq=False)
class RegionSpec:
    """One region as the user defines it.

    mask: (H, W) for one canvas, or (N, H, W) for N latents that each get their own mask
    (a batch, or the frames of a stream). The region's coverage is strength * mask.
    weight: scales the region's attention logits (bias log M + log weight), distinct from opacity.
    context: token embeddings (1, L, D) from a CONDITIONING; then they are the region's tokens
    and the prompt is only a label.
    loras: region LoRAs (opaque to the palette: the attention patch applies them).
    """

    prompt: str
    mask: torch.Tensor
    strength: float = 1.0
    negative: str = ""
    name: str = ""
    color: str = ""
    weight: float = 1.0
    context: torch.Tensor | None = None
    loras: tuple = ()

    def __post_init__(self) -> None:
        what = f"region '{self.name}'" if self.name else "region"
        if self.context is not None:
            if not isinstance(self.context, torch.Tensor) or self.context.ndim != 3 or self.context.shape[0] != 1 \
                    or self.context.shape[1] == 0 or not torch.is_floating_point(self.context):
                shape = tuple(self.context.shape) if isinstance(self.context, torch.Tensor) else type(self.context).__name__
                raise PaletteError(f"{what}: a conditioning must hold one float tensor of token embeddings "
                                   f"(1, tokens, width), got {shape}")
            if not bool(torch.isfinite(self.context).all()):
                raise PaletteError(f"{what}: the conditioning contains NaN or infinite values")
        elif not isinstance(self.prompt, str) or not self.prompt.strip():
            raise PaletteError(f"{what}: prompt is empty; every region needs the text it should show "
                               "(or a conditioning)")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and 0.0 < self.weight <= MAX_WEIGHT):
            raise PaletteError(f"{what}: weight must be a number in (0, {MAX_WEIGHT:g}], got {self.weight!r}")
        if not isinstance(self.mask, torch.Tensor) or self.mask.ndim not in (2, 3):
            shape = tuple(self.mask.shape) if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            raise PaletteError(f"{what}: mask must be (H, W) or (N, H, W), got {shape}")
        check_mask_values(self.mask, what)
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            raise PaletteError(f"{what}: strength must be a number in [0, 1], got {self.strength!r}")
        if self.color and not _HEX_COLOR.match(self.color):
            raise PaletteError(f"{what}: colour must look like '#rrggbb', got {self.color!r}")

    @property
    def samples(self) -> int:
        return 1 if self.mask.ndim == 2 else self.mask.shape[0]

    def coverage(self, height: int, width: int) -> torch.Tensor:
        """strength * mask as (N, H, W) float32, resized to the canvas by the documented rule."""
        mask = self.mask if self.mask.ndim == 3 else self.mask.unsqueeze(0)
        what = f"region '{self.name}'" if self.name else "region"
        return resize_mask_to_canvas(mask.float(), width, height, what) * float(self.strength)


def add_region(chain: Sequence[RegionSpec], spec: RegionSpec) -> tuple[RegionSpec, ...]:
    """A new chain with spec appended; the old chain is untouched."""
    chain = tuple(chain)
    if len(chain) >= MAX_REGIONS:
        raise PaletteError(f"a palette holds at most {MAX_REGIONS} regions; this chain already has {len(chain)}")
    name = spec.name or f"region {len(chain) + 1}"
    color = spec.color or DEFAULT_COLORS[len(chain) % len(DEFAULT_COLORS)]
    if name != spec.name or color != spec.color:
        spec = replace(spec, name=name, color=color)
    return chain + (spec,)


@dataclass(frozen=True, eq=False)
class Region:
    """A region with its prompts encoded: context (1, L, D), negative_context (1, L', D) or None."""

    spec: RegionSpec
    context: torch.Tensor
    negative_context: torch.Tensor | None = None


Encoder = Callable[[str], torch.Tensor]
"""Text -> token embeddings (1, L, D); the node passes one built from a ComfyUI CLIP."""


@dataclass(frozen=True, eq=False)
class Palette:
    """Background prompt + regions over a width x height canvas (pixels)."""

    width: int
    height: int
    background: str
    background_context: torch.Tensor
    regions: tuple[Region, ...]
    _coverage: torch.Tensor = field(repr=False, default=None)
    drawn: int = 0  # how many leading regions came from the drawing widget (live edits replace those)
    encoder: str = ""  # the text encoder family that encoded the prompts ("sd1", "sdxl", "sd3", "flux"; "" unknown)

    @classmethod
    def build(cls, specs: Sequence[RegionSpec], background: str, width: int, height: int, encode: Encoder,
              drawn: int = 0, encoder: str = "") -> "Palette":
        """Validate everything first (cheap), then encode every prompt once."""
        if not isinstance(width, int) or not isinstance(height, int) or width < 8 or height < 8:
            raise PaletteError(f"canvas size must be whole pixels >= 8, got {width} x {height}")
        specs = tuple(specs)
        if not specs:
            raise PaletteError("the palette is empty: add at least one region (a mask and a prompt); "
                               "for a single prompt over the whole canvas use plain conditioning instead")
        if len(specs) > MAX_REGIONS:
            raise PaletteError(f"a palette holds at most {MAX_REGIONS} regions, got {len(specs)}")
        coverage = [s.coverage(height, width) for s in specs]
        counts = sorted({c.shape[0] for c in coverage} - {1})
        if len(counts) > 1:
            raise PaletteError(f"regions carry mask batches of different sizes {counts}; "
                               "use one mask per region or the same batch size for all")
        samples = counts[0] if counts else 1
        stacked = torch.stack([c.expand(samples, -1, -1) for c in coverage], dim=1)  # (N, P, H, W)

        background_context = _encoded(encode, background, "background prompt")
        regions = []
        for spec in specs:
            ctx = spec.context if spec.context is not None else _encoded(encode, spec.prompt, f"region '{spec.name}' prompt")
            neg = _encoded(encode, spec.negative, f"region '{spec.name}' negative") if spec.negative.strip() else None
            if ctx.shape[-1] != background_context.shape[-1]:
                raise PaletteError(f"region '{spec.name}': its tokens are {ctx.shape[-1]} wide but the background's are "
                                   f"{background_context.shape[-1]}; encode every prompt and conditioning with one CLIP")
            regions.append(Region(spec, ctx, neg))
        return cls(width, height, background, background_context, tuple(regions), stacked.contiguous(), drawn, encoder)

    @property
    def context_dim(self) -> int:
        return int(self.background_context.shape[-1])

    @property
    def samples(self) -> int:
        """How many latents the masks describe (1 = one set broadcast to every latent)."""
        return int(self._coverage.shape[0])

    def frame(self, index: int) -> "Palette":
        """The palette of latent `index` alone (one mask set); prompts and encodings are shared."""
        if not 0 <= index < self.samples:
            raise PaletteError(f"mask set {index} does not exist: this palette has {self.samples}")
        if self.samples == 1:
            return self
        return Palette(self.width, self.height, self.background, self.background_context, self.regions,
                       self._coverage[index:index + 1], self.drawn, self.encoder)

    def region_coverage(self) -> torch.Tensor:
        """(N, P, H, W) float32: strength * mask per region at canvas size."""
        return self._coverage

    def coverage_with_background(self) -> torch.Tensor:
        """(N, 1 + P, H, W): background clip(1 - sum, 0, 1) first, then the regions."""
        cov = self._coverage
        background = (1.0 - cov.sum(dim=1, keepdim=True)).clamp(0.0, 1.0)
        return torch.cat([background, cov], dim=1)


def _encoded(encode: Encoder, text: str, what: str) -> torch.Tensor:
    ctx = encode(text)
    if not isinstance(ctx, torch.Tensor) or ctx.ndim != 3 or ctx.shape[0] != 1:
        raise PaletteError(f"{what}: the text encoder returned {getattr(ctx, 'shape', type(ctx))}, expected (1, tokens, dim)")
    return ctx
