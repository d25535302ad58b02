"""A LoRA per region, in the same single model pass.

For a LoRA with delta D = strength * (W' - W) on a layer with weight W, bound to region r with
coverage m_r (strength x mask, at the layer's resolution; soft masks blend):

    layers acting on image tokens (convolutions, self-attention q / k / v / out, feed-forward,
    cross-attention q and out, proj_in / proj_out):   y(p) = W x(p) + m_r(p) (D x)(p)
    layers acting on a per-sample vector (time / label embeddings): y = W x + mean_p(m_r) (D x)
    cross-attention k and v: region r's own prompt tokens are projected with W + D, every other
    prompt's tokens (the background, other regions, the negative) with W
    norms: untouched

so a region covering the whole canvas equals the LoRA loaded globally (on the model; the text
encoder is not LoRA'd per region), and with hard disjoint masks a region's pixels do not depend
on another region's LoRA. Low-rank LoRAs cost one low-rank product per LoRA'd layer per region
LoRA, in the same UNet call; other adapter kinds (LoHa, LoKr, diffs) use their dense delta.

The deltas come from a `DeltaLoader` (the node layer builds them with ComfyUI's own LoRA key
mapping); this module never imports ComfyUI. Hooks are forward hooks registered for one model
call and removed after it, so other clones of the model never see them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .masks import unet_level_sizes
from .palette import PaletteError


@dataclass(frozen=True, eq=False)
class RegionLoRA:
    """A LoRA file bound to a region: its name (for messages), strength and tensors as stored."""

    name: str
    strength: float
    weights: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not (isinstance(self.strength, (int, float)) and math.isfinite(self.strength)):
            raise PaletteError(f"region LoRA '{self.name}': strength must be a finite number, got {self.strength!r}")


@dataclass(frozen=True, eq=False)
class LayerDelta:
    """One LoRA's change of one layer's output: low-rank (down, up, scale) or a dense weight
    delta, plus an optional bias delta. Strength is already folded in."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def apply(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(D x) for this layer's input x, in x's dtype and device."""
        conv = isinstance(module, torch.nn.Conv2d)
        cast = lambda t: None if t is None else t.to(device=x.device, dtype=x.dtype)  # noqa: E731
        if self.weight is not None:
            w, b = cast(self.weight), cast(self.bias)
            if conv:
                return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
            return F.linear(x, w, b)
        down, up = cast(self.down), cast(self.up)
        if conv:
            h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation, module.groups)
            out = F.conv2d(h, up) * self.scale
        else:
            out = F.linear(F.linear(x, down), up) * self.scale
        if self.bias is not None:
            out = out + (cast(self.bias)[:, None, None] if conv else cast(self.bias))
        return out


DeltaLoader = Callable[[RegionLoRA], Mapping[str, LayerDelta]]
"""A region LoRA -> its deltas by module name (relative to the diffusion model)."""


class RegionalLoRA:
    """The region LoRAs of every palette a model call serves, as masked deltas.

    kv_names: cross-attention layer key -> module name of that attn2 (its to_k / to_v deltas
    apply to the region's own tokens, not through the hooks).
    """

    def __init__(self, loader: DeltaLoader, kv_names: Mapping[tuple, str]) -> None:
        self.loader = loader
        self.kv_names = dict(kv_names)
        self._deltas: dict[int, tuple] = {}
        self._modules: tuple[torch.nn.Module, dict] | None = None  # the model hooked last and its modules by name

    def _entry(self, lora: RegionLoRA) -> tuple:
        """(lora, all its deltas, those applied through hooks: every layer but the cross-attention
        k / v), loaded once per LoRA object."""
        hit = self._deltas.get(id(lora))
        if hit is None or hit[0] is not lora:
            deltas = dict(self.loader(lora))
            skip = {f"{n}.{p}" for n in self.kv_names.values() for p in ("to_k", "to_v")}
            hit = self._deltas[id(lora)] = (lora, deltas, {n: d for n, d in deltas.items() if n not in skip})
        return hit

    def deltas(self, lora: RegionLoRA) -> Mapping[str, LayerDelta]:
        return self._entry(lora)[1]

    def check(self, loras: Iterable[RegionLoRA]) -> None:
        """Build every delta now, so a bad file is reported before sampling."""
        for lora in loras:
            self.deltas(lora)

    def kv_delta(self, key: tuple, lora: RegionLoRA) -> tuple[LayerDelta | None, LayerDelta | None]:
        name = self.kv_names.get(key)
        if name is None:
            return None, None
        d = self.deltas(lora)
        return d.get(f"{name}.to_k"), d.get(f"{name}.to_v")

    def image_layers(self, lora: RegionLoRA) -> Mapping[str, LayerDelta]:
        """The deltas applied through hooks: every layer but the cross-attention k / v."""
        return self._entry(lora)[2]

    def modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The model's modules by name, listed once per model."""
        if self._modules is None or self._modules[0] is not model:
            self._modules = (model, dict(model.named_modules()))
        return self._modules[1]

    def install(self, model: torch.nn.Module, rows: Sequence[Any], chunks: int, latent_hw: tuple[int, int]) -> list:
        """Forward hooks on the diffusion model's layers for one model call; returns handles to remove afterwards.

        rows: per latent, the region specs' (lora, coverage (H, W)) pairs of its palette;
        the batch is `chunks` chunks (cond / uncond) of len(rows) latents."""
        per_layer: dict[str, list[tuple[LayerDelta, torch.Tensor]]] = {}
        by_lora: dict[int, tuple[RegionLoRA, list]] = {}
        n = len(rows)
        for i, pairs in enumerate(rows):
            for lora, coverage in pairs:
                entry = by_lora.setdefault(id(lora), (lora, [None] * n))
                prev = entry[1][i]
                entry[1][i] = coverage if prev is None else (prev + coverage).clamp(max=1.0)
        for lora, covers in by_lora.values():
            ref = next(c for c in covers if c is not None)
            stacked = torch.stack([c if c is not None else torch.zeros_like(ref) for c in covers])  # (n, H, W)
            for name, delta in self.image_layers(lora).items():
                per_layer.setdefault(name, []).append((delta, stacked))
        if not per_layer:
            return []
        sizes = unet_level_sizes(int(latent_hw[0]), int(latent_hw[1]), 6)
        masks: dict[tuple, torch.Tensor] = {}

        def mask_for(coverage: torch.Tensor, out: torch.Tensor, tokens: int | None) -> torch.Tensor:
            if out.ndim == 4:
                h, w = out.shape[-2:]
            elif tokens is not None:
                size = next(((h, w) for h, w in sizes if h * w == tokens), None)
                if size is None:
                    raise PaletteError(f"region LoRA: a layer over {tokens} tokens matches no resolution of this "
                                       f"{latent_hw[0]} x {latent_hw[1]} latent; RCCA cannot place its delta")
                h, w = size
            else:
                h = w = None
            key = (id(coverage), h, w, out.ndim, out.device, out.dtype)
            hit = masks.get(key)
            if hit is None:
                if h is None:  # a per-sample vector: the region's mean coverage
                    m = coverage.float().mean(dim=(-2, -1))[:, None]
                else:
                    m = F.interpolate(coverage[:, None].float(), size=(h, w), mode="area")
                    m = m if out.ndim == 4 else m.flatten(2).transpose(1, 2)  # (n, hw, 1)
                m = m.repeat(chunks, *([1] * (m.ndim - 1)))
                hit = masks[key] = m.to(device=out.device, dtype=out.dtype)
            return hit

        def hook_for(name: str):
            terms = per_layer[name]

            def hook(module, inputs, out):
                x = inputs[0]
                tokens = x.shape[1] if x.ndim == 3 else None
                for delta, coverage in terms:
                    out = out + mask_for(coverage, out, tokens) * delta.apply(module, x)
                return out

            return hook

        handles = []
        modules = self.modules(model)
        missing = [name for name in per_layer if name not in modules]
        if missing:
            raise PaletteError(f"region LoRA: this model has no layer {missing[0]}")
        for name in per_layer:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        return handles


def add_kv_deltas(k: torch.Tensor, v: torch.Tensor, context: torch.Tensor, spans: Sequence[tuple[int, int]],
                  deltas: Sequence[tuple[LayerDelta | None, LayerDelta | None]], module_k: torch.nn.Module,
                  module_v: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V (1, L, inner) of the concatenated region contexts with LoRA k / v deltas added on
    their region's own tokens (one (start, end) span and one (k, v) delta pair per region LoRA)."""
    k, v = k.clone(), v.clone()
    for (start, end), (dk, dv) in zip(spans, deltas):
        ctx = context[:, start:end].to(k.dtype)
        if dk is not None:
            k[:, start:end] += dk.apply(module_k, ctx)
        if dv is not None:
            v[:, start:end] += dv.apply(module_v, ctx)
    return k, v
