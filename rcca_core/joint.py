"""RCCA on joint attention (MMDiT: SD3 / SD3.5, Flux).

In joint attention the text tokens are part of the sequence: every block attends over
[text | image] at once, and the text tokens have their own stream through the blocks. RCCA
puts every region prompt's text tokens after the background prompt's tokens, so they flow
through the text stream of every block, and constrains the attention with one additive bias
over the joint sequence. Blocks of text tokens: k = 0 the model's own context (the
background prompt, or the negative on uncond rows), then the region prompts, then the
regions' own negative prompts. With W_k(p) the weight of block k at image token p (cond rows:
the background's coverage M_0 = clip(1 - sum_r M_r, 0, 1), then each region's M_r; uncond
rows: a region's negative inside it, the shared negative elsewhere; as on the UNet):

    image p  -> text of block k:  log W_k(p)   (soft; W <= eps counts as none: -inf)
                                  0 if W_k(p) >= 0.5 else -inf   (hard)
                                  a row left without a finite text entry falls back to block 0
    image p  -> image:            0 (unchanged)
    text of k -> text of k:       0;   text of k -> text of j != k: -inf (each prompt reads itself)
    text of k -> image p:         block 0: 0 (the background sees the whole image);
                                  k > 0: log W_k(p) (soft) / 0 or -inf at 0.5 (hard) ("region"),
                                  or 0 wherever the block has any coverage ("everywhere")

Soft mode with several prompts at one image token (soft edges, opacity, overlaps): with the
bias above, block k would get text mass W_k Z_k, Z_k = sum over k's tokens of exp(q k / sqrt(d)),
so a prompt whose keys match better wins whatever the opacity. On those rows the bias of block
k becomes 2 log W_k - log S_k - 2 log sum_j W_j, with S_k = W_k Z_k / sum_j W_j Z_j, which
gives block k the mass

    (W_k / sum_j W_j) * (sum_j W_j Z_j / sum_j W_j)

against the image tokens' own mass: each prompt gets exactly its coverage share of the
token's text attention, and the text as a whole weighs against the image as much as the
coverage-weighted mean of what each prompt alone would get. A row with one active block (hard
partitions, a region painted at 100 %) keeps its bias bit for bit. Hard mode never
normalises. Every row keeps a finite entry (its own text block, or the image), so no NaN.

`JointRegionalAttention` plugs this into a model that passes ComfyUI's transformer_options to
its attention calls (`optimized_attention_override`) without importing ComfyUI: the caller
extends the context with `extend_context` and puts `call_inputs` in the transformer options
once per model call; the override adds the bias at every attention call over the joint
sequence and passes the others (SD3.5's image-only self-attention) through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .attention import ATTENTION_MODES, ChainedOverride, PreparedPalette, region_bias, row_layout, whole_chunks
from .masks import MaskPyramid
from .palette import Palette, PaletteError

TEXT_SEES = ("region", "everywhere")
CALL_KEY = "rcca_joint"  # transformer_options entry holding one model call's joint-attention inputs


@dataclass(frozen=True)
class JointOptions:
    mode: str = "soft"
    eps: float = 1e-4
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    text_sees: str = "region"  # what a region prompt's text tokens read of the image
    normalize: bool = True  # soft mode: each prompt's share of a token's text attention is its coverage share

    def __post_init__(self) -> None:
        if self.mode not in ATTENTION_MODES:
            raise PaletteError(f"attention mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if self.text_sees not in TEXT_SEES:
            raise PaletteError(f"text_sees must be one of {TEXT_SEES}, got {self.text_sees!r}")
        if not 0.0 < self.eps < 0.5:
            raise PaletteError(f"eps must be in (0, 0.5), got {self.eps}")

    def active_at(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start


def token_grid(latent_height: int, latent_width: int, patch: int) -> tuple[int, int]:
    """Image tokens of a patchified latent: the model pads to whole patches (a 9-wide latent in
    2 x 2 patches gives 5 tokens)."""
    return math.ceil(latent_height / patch), math.ceil(latent_width / patch)


def first_tokens(counts: Sequence[int]) -> list[int]:
    """Index of every block's first token in the text sequence."""
    return [int(sum(counts[:i])) for i in range(len(counts))]


def joint_bias(weights: torch.Tensor, counts: Sequence[int], mode: str = "soft", eps: float = 1e-4,
               text_sees: str = "region", log_scale: Sequence[float] | None = None) -> torch.Tensor:
    """Block weights (N, K, hw) -> additive bias (N, T + hw, T + hw) over [text | image], float32,
    T = sum(counts): the formula of this module's docstring (before soft normalisation); log_scale
    (K,) the log of each block's region weight, added to the image -> text logits."""
    if weights.shape[1] != len(counts):
        raise ValueError(f"{weights.shape[1]} weight blocks but {len(counts)} token blocks")
    weights = weights.float()
    n, blocks, hw = weights.shape
    text = int(sum(counts))
    device = weights.device
    neg_inf = torch.tensor(float("-inf"), device=device)
    zero = torch.zeros((), device=device)
    out = torch.zeros(n, text + hw, text + hw, device=device)
    out[:, text:, :text] = region_bias(weights, counts, mode, eps, log_scale)
    ids = torch.repeat_interleave(torch.arange(blocks, device=device), torch.as_tensor(list(counts), device=device))
    out[:, :text, :text] = torch.where(ids[:, None] == ids[None, :], zero, neg_inf)
    if text_sees == "everywhere":
        seen = torch.where((weights > eps).any(dim=-1, keepdim=True), zero, neg_inf).expand(-1, -1, hw)
    elif mode == "hard":
        seen = torch.where(weights >= 0.5, zero, neg_inf)
    else:
        seen = torch.where(weights > eps, weights.clamp_min(eps).log(), neg_inf)
    seen = seen.clone()
    seen[:, 0] = 0.0  # the background (or shared negative) prompt reads the whole image
    out[:, :text, text:] = seen.repeat_interleave(torch.as_tensor(list(counts), device=device), dim=1)
    return out


def normalize_joint_mass(q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor, text: int,
                         block_ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Soft-mode joint bias (B, L, L) -> (B, heads, L, L) whose image rows give every text block
    the mass the module docstring states. q, k: (B, heads, L, d) or (B, L, heads * d) over
    [text | image]; block_ids (text,) the block of every text token; first (K,) each block's first token."""
    if q.ndim == 3:
        b, length, inner = q.shape
        d = inner // heads
        q = q.reshape(b, length, heads, d).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2)
    d = q.shape[-1]
    image_text = bias[:, text:, :text].float()  # (B, hw, T)
    onehot = F.one_hot(block_ids.long(), first.shape[0]).to(torch.float32)  # (T, K)
    weight = image_text[..., first].exp()  # (B, hw, K): W_k(p), 0 for inactive blocks (eps-clamped as in the bias)
    active = weight > 0
    mixed = active.sum(-1) > 1  # (B, hw)
    logits = torch.matmul(q[:, :, text:].float() * d ** -0.5, k[:, :, :text].float().transpose(-1, -2))
    logits = logits + image_text[:, None]
    share = torch.matmul(torch.softmax(logits, dim=-1), onehot)  # S_k: (B, heads, hw, K)
    total = weight.sum(-1, keepdim=True)[:, None]
    per_block = 2 * weight.clamp_min(1e-30).log()[:, None] - share.clamp_min(1e-30).log() - 2 * total.log()
    per_block = torch.where(active[:, None], per_block, torch.full((), float("-inf"), device=q.device))
    # back to tokens: a gather by block id (every token of a block gets its block's value)
    normalized = per_block[..., block_ids.long()]  # (B, heads, hw, T)
    image_text = torch.where(mixed[:, None, :, None], normalized, image_text[:, None])
    out = bias.float()[:, None].expand(-1, heads, -1, -1).clone()
    out[:, :, text:, :text] = image_text
    return out


class PreparedJointPalette:
    """A palette made ready for joint attention: its region contexts concatenated (region
    prompts, then their own negatives, as on the UNet) and its biases cached per token grid."""

    def __init__(self, palette: Palette, pyramid: MaskPyramid | None = None, options: JointOptions = JointOptions()) -> None:
        self.prepared = PreparedPalette(palette, pyramid, options.mode)
        self.options = options
        self._bias: dict[tuple, tuple] = {}
        self._blocks: dict[tuple, tuple] = {}

    @property
    def palette(self) -> Palette:
        return self.prepared.palette

    @property
    def context(self) -> torch.Tensor:
        """(1, extra tokens, D): the region prompts' tokens, then their negatives'."""
        return self.prepared.context

    def counts(self, own: int) -> list[int]:
        return [own] + self.prepared.token_counts + self.prepared.negative_counts

    def token_blocks(self, own: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(block of every text token (T,), first token of every block (K,)), made once per device."""
        key = (own, device)
        hit = self._blocks.get(key)
        if hit is None:
            counts = self.counts(own)
            hit = self._blocks[key] = (
                torch.repeat_interleave(torch.arange(len(counts), device=device), torch.as_tensor(counts, device=device)),
                torch.as_tensor(first_tokens(counts), device=device))
        return hit

    def bias(self, h: int, w: int, own: int, active: bool, device: torch.device) -> dict[int, tuple[torch.Tensor, bool]]:
        """{0: cond, 1: uncond} -> (bias (N, T + hw, T + hw) float32, whether any image token reads
        several prompts). Inactive (outside the sigma range): image tokens read block 0 alone."""
        key = (h, w, own, active, device)
        hit = self._bias.get(key)
        if hit is not None:
            return hit
        level = self.prepared.pyramid.level(h, w).to(device)
        counts = self.counts(own)
        per_kind = self.prepared.block_weights(level)
        first = self.token_blocks(own, device)[1]
        hit = {}
        for kind, weights in per_kind.items():
            if not active:
                weights = torch.cat([torch.ones_like(weights[:, :1]), torch.zeros_like(weights[:, 1:])], dim=1)
            o = self.options
            bias = joint_bias(weights, counts, o.mode, o.eps, o.text_sees, self.prepared.log_weights[kind] if active else None)
            text = sum(counts)
            readable = torch.isfinite(bias[:, text:, first])  # (N, hw, K): blocks an image token reads
            mixed = o.mode == "soft" and o.normalize and bool((readable.sum(-1) > 1).any())
            hit[kind] = (bias, mixed)
        if len(self._bias) > 16:
            self._bias.clear()
        self._bias[key] = hit
        return hit


class JointRegionalAttention(ChainedOverride):
    """RCCA for joint-attention models as ComfyUI hooks.

    - `extend_context` appends the region tokens to the model's own context (every row: the
      rows of one batch share one sequence layout; the bias decides who reads them);
    - `call_inputs` builds one model call's bias over the joint sequence for the batch's rows
      (cond / uncond chunks as ComfyUI lists them in transformer_options["cond_or_uncond"]);
    - `attention_override` (transformer_options["optimized_attention_override"]) adds that bias
      at every attention call over the joint sequence, chaining an earlier override.
    """

    def __init__(self, palette: Palette, options: JointOptions = JointOptions(), pyramid: MaskPyramid | None = None,
                 patch: int = 2, previous_override: Callable[..., Any] | None = None) -> None:
        self.prepared = PreparedJointPalette(palette, pyramid, options)
        self.options = options
        self.patch = int(patch)
        self.previous_override = previous_override
        self._rows: dict[tuple, torch.Tensor] = {}

    @property
    def palette(self) -> Palette:
        return self.prepared.palette

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options and with them our bound hooks; the
        # object is immutable in what it computes and its caches stay valid for every clone
        return self

    def extend_context(self, context: torch.Tensor) -> torch.Tensor:
        """(rows, own, D) -> (rows, own + extra, D)."""
        if context.ndim != 3 or context.shape[-1] != self.prepared.context.shape[-1]:
            raise PaletteError(
                f"RCCA: the model's text context is {tuple(context.shape)} but the palette's prompts are "
                f"{self.prepared.context.shape[-1]}-wide token embeddings; encode the palette with the CLIP of the "
                "same checkpoint")
        extra = self.prepared.context.to(device=context.device, dtype=context.dtype)
        return torch.cat([context, extra.expand(context.shape[0], -1, -1)], dim=1)

    def call_inputs(self, transformer_options: Mapping, latent_shape: Sequence[int], own: int,
                    dtype: torch.dtype, device: torch.device) -> dict:
        """One model call's inputs: "bias" (rows, L, L) in dtype (or float32 while soft rows still
        need normalising), "length" L, "text" T, "ids" (T,) block of every text token, "first" (K,)
        each block's first token, "mixed", "rows", "grid" (h, w) image tokens, "calls" (how many
        attention calls took the bias: the caller checks it is not 0 after the model ran)."""
        rows = int(latent_shape[0])
        layout, _, n = whole_chunks(transformer_options, rows)
        layout = row_layout(rows, n, layout, None)
        samples = self.prepared.prepared.samples
        if samples not in (1, n):
            raise PaletteError(f"the palette has {samples} mask sets but the latent batch has {n} latents; "
                               "give one mask per region, or a mask batch of the latent batch size")
        sigmas = transformer_options.get("sigmas")
        sigma = None if sigmas is None or (math.isinf(self.options.sigma_start) and self.options.sigma_end <= 0) \
            else float(sigmas.max())
        active = self.options.active_at(sigma)
        h, w = token_grid(int(latent_shape[-2]), int(latent_shape[-1]), self.patch)
        counts = self.prepared.counts(int(own))
        text = sum(counts)
        key = (h, w, own, layout, n, active, dtype, device)
        per_kind = self.prepared.bias(h, w, int(own), active, device)
        mixed = any(per_kind[1 if c == 1 else 0][1] for c in set(layout))
        bias = self._rows.get(key)
        if bias is None:
            bias = torch.cat([per_kind[1 if c == 1 else 0][0].expand(n, -1, -1) for c in layout], dim=0)
            bias = bias.to(torch.float32 if mixed else dtype)
            if len(self._rows) > 16:
                self._rows.clear()
            self._rows[key] = bias
        ids, first = self.prepared.token_blocks(int(own), device)
        return {"bias": bias, "length": text + h * w, "text": text, "ids": ids, "first": first, "mixed": mixed,
                "rows": rows, "grid": (h, w), "calls": 0}

    def with_call(self, transformer_options: dict, latent_shape: Sequence[int], own: int,
                  dtype: torch.dtype, device: torch.device) -> dict:
        """transformer_options plus CALL_KEY: this model call's inputs for the override."""
        inputs = self.call_inputs(transformer_options, latent_shape, own, dtype, device)
        return {**transformer_options, CALL_KEY: inputs}

    def attention_override(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        inputs = options.get(CALL_KEY)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs["heads"]  # SD3 passes heads by name
        split_heads = kwargs.get("skip_reshape", False) or q.ndim == 4
        length = q.shape[2] if split_heads else q.shape[1]
        if inputs is None or length != inputs["length"]:
            return self._call(func, args, kwargs)  # not a joint call over this palette's sequence
        if q.shape[0] != inputs["rows"]:
            raise PaletteError(f"RCCA: a joint attention call over {q.shape[0]} rows, but the model was called with "
                               f"{inputs['rows']}; another patch changed the batch, which RCCA cannot follow")
        mask = args[4] if len(args) > 4 else kwargs.pop("mask", None)
        inputs["calls"] += 1
        bias = inputs["bias"]
        if inputs["mixed"]:
            bias = normalize_joint_mass(q, k, heads, bias, inputs["text"], inputs["ids"], inputs["first"])
        if mask is not None:
            if mask.shape[-1] != length or mask.shape[-2] not in (1, length):
                raise PaletteError(f"RCCA: another node's attention mask covers {tuple(mask.shape)} but the joint "
                                   f"sequence with the region prompts has {length} tokens; use one of the two")
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
            if mask.ndim == 4 and bias.ndim == 3:
                bias = bias[:, None]
            elif mask.ndim == 3 and bias.ndim == 4:
                mask = mask[:, None]
            bias = bias + mask.to(bias.dtype)
        kwargs["mask"] = bias.to(q.dtype)
        return self._call(func, tuple(args[:4]) + tuple(args[5:]), kwargs)

    def install(self, model_options: dict) -> None:
        """Register the override in a (cloned) ComfyUI model_options dict."""
        to = model_options.setdefault("transformer_options", {})
        to["optimized_attention_override"] = self.attention_override

    def uninstall(self, model_options: dict) -> None:
        self._restore_override(model_options.get("transformer_options", {}))

    @classmethod
    def installed_in(cls, model_options: dict) -> "JointRegionalAttention | None":
        override = model_options.get("transformer_options", {}).get("optimized_attention_override")
        while override is not None:
            owner = getattr(override, "__self__", None)
            if isinstance(owner, cls):
                return owner
            override = getattr(owner, "previous_override", None)
        return None
