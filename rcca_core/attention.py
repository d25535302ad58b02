"""Region-constrained cross-attention (RCCA).

Every region prompt's tokens join the cross-attention context, and a per-pixel bias lets each
pixel attend only to the prompts that cover it:

    Attention = softmax(Q K^T / sqrt(d) + B) V,   B[p, token of prompt r] = log M_r(p)

with M_0 = clip(1 - sum_r M_r, 0, 1) for the background (block 0: the sampler's own positive
context). Soft mode uses log M (coverage at or below eps counts as none, -inf) minus, where a
pixel reads several prompts, log Z_r = log sum over r's tokens of exp(q k / sqrt(d)), so each
prompt's share of the attention is exactly M_r (normalize_block_mass); hard mode uses 0 where
M >= 0.5 and -inf elsewhere. A row left with no finite entry falls back to block 0, so softmax
never sees an all -inf row (no NaN). Self-attention stays unmasked (so regions still see each
other and blend) unless self_sigma_end asks it to keep to regions in the early steps.

`RegionalCrossAttention` plugs this into a UNet that follows ComfyUI's transformer-options
protocol (attn1/attn2 patch lists and `optimized_attention_override`) without importing it.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .masks import MaskPyramid, unet_level_sizes
from .palette import MAX_REGIONS, Palette, PaletteError
from .region_lora import RegionalLoRA, add_kv_deltas

ATTENTION_MODES = ("soft", "hard")
BLOCK_KINDS = ("input", "middle", "output")
LayerKey = tuple[str, int, int]  # (block kind, block id, transformer index) as ComfyUI names them
TICK_KEY = "rcca_tick"  # transformer_options entry holding one model call's precomputed RCCA tensors


CLIP_CHUNK = 77  # ComfyUI encodes prompts in chunks of 77 tokens (SD1.5 and SDXL)


def token_bucket(tokens: int, unit: int = CLIP_CHUNK) -> int:
    """Extra tokens padded to a power of two of prompt chunks (77, 154, 308, 616, 1232 tokens):
    palettes whose prompts fit the same bucket give tensors of one shape, so a compiled graph
    serves them all. With one 77-token chunk per prompt, 1, 2, 4, 8 and 16 regions need no
    padding, 3 regions pad to 4's, 5 to 7 to 8's."""
    chunks = max(1, -(-int(tokens) // unit))
    return unit * (1 << (chunks - 1).bit_length())


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # older torch
        return False


@dataclass(frozen=True)
class RCCAOptions:
    mode: str = "soft"
    eps: float = 1e-4
    blocks: frozenset[tuple[str, int | None]] | None = None  # None: every cross-attention layer
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    normalize: bool = True  # soft mode: each prompt's attention mass is exactly its coverage (normalize_block_mass)
    self_sigma_end: float = math.inf  # self-attention keeps to regions while sigma >= this (inf: never)

    def __post_init__(self) -> None:
        if self.mode not in ATTENTION_MODES:
            raise PaletteError(f"attention mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if not 0.0 < self.eps < 0.5:
            raise PaletteError(f"eps must be in (0, 0.5), got {self.eps}")

    def applies_to(self, kind: str, block_id: int) -> bool:
        return self.blocks is None or (kind, None) in self.blocks or (kind, block_id) in self.blocks

    @property
    def full_range(self) -> bool:
        return math.isinf(self.sigma_start) and self.sigma_end <= 0.0


def parse_blocks(spec: str) -> frozenset[tuple[str, int | None]] | None:
    """'all' or a comma list of input / middle / output, each optionally ':id' (e.g. 'input:4, output')."""
    text = (spec or "").strip().lower()
    if text in ("", "all"):
        return None
    out = set()
    for part in text.split(","):
        part = part.strip()
        kind, _, num = part.partition(":")
        kind = kind.strip()
        if kind not in BLOCK_KINDS or (num and not num.strip().isdigit()):
            raise PaletteError(f"blocks: cannot read {part!r}; use 'all' or a comma list of "
                               f"{', '.join(BLOCK_KINDS)}, each optionally with ':<block id>' (e.g. 'input:4, middle')")
        out.add((kind, int(num) if num else None))
    return frozenset(out)


def row_layout(rows: int, latents: int, armed: Sequence[int], live: Sequence[int] | None) -> tuple[int, ...]:
    """Cond (0) / uncond (1) kind of each chunk of `latents` rows in a batch of `rows` rows.

    ComfyUI stacks one chunk of n latents per entry of transformer_options["cond_or_uncond"].
    Attention-couple packs expand the batch inside attn2 (one copy of the cond rows per couple
    region); those that keep the list in step with the rows (Acly's tooling nodes) are followed
    through the live list, a batch made only of cond (or only uncond) rows is unambiguous, and
    anything else is refused: guessing which rows are cond would put the region bias on the
    wrong rows and silently switch RCCA off.
    """
    if latents <= 0 or rows % latents:
        raise PaletteError(f"RCCA: a batch of {rows} attention rows does not hold whole chunks of {latents} latents; "
                           "another patch changed the batch in a way RCCA cannot follow")
    chunks = rows // latents
    if live is not None and len(live) == chunks:
        return tuple(int(c) for c in live)
    if len(armed) == chunks:
        return tuple(int(c) for c in armed)
    kinds = {int(c) for c in (live if live is not None else armed)}
    if len(kinds) == 1:
        return (kinds.pop(),) * chunks
    raise PaletteError(
        f"RCCA: another attention patch expanded this layer's batch from {len(armed) * latents} rows "
        f"(cond/uncond chunks {list(armed)}) to {rows} rows without updating transformer_options['cond_or_uncond'], "
        "as attention-couple nodes that repeat the cond rows per region do; RCCA cannot tell which rows are the "
        "prompt and which the negative. Move those regions into the palette (Add Region), or use an attention "
        "couple that keeps cond_or_uncond in step with the batch (e.g. Acly's Regions Attention Mask)")


def call_layout(transformer_options: Mapping, total: int) -> tuple[tuple[int, ...], int, int] | None:
    """(cond 0 / uncond 1 kind of each chunk, chunks, latents per chunk) of one model call's batch
    of `total` rows as ComfyUI lists them; None when the rows do not split into whole chunks."""
    layout = tuple(int(c) for c in (transformer_options.get("cond_or_uncond") or (0,)))
    # uuids has one entry per chunk ComfyUI batched and, unlike cond_or_uncond, no patch edits it
    chunks = len(transformer_options.get("uuids") or layout)
    if chunks <= 0 or total % chunks:
        return None
    return layout, chunks, total // chunks


def whole_chunks(transformer_options: Mapping, total: int) -> tuple[tuple[int, ...], int, int]:
    """call_layout, or the error saying the batch cannot be read."""
    split = call_layout(transformer_options, total)
    if split is None:
        chunks = len(transformer_options.get("uuids") or transformer_options.get("cond_or_uncond") or (0,))
        raise PaletteError(f"RCCA: a batch of {total} latents does not hold whole chunks of {chunks} conditionings")
    return split


def region_bias(weights: torch.Tensor, token_counts: Sequence[int], mode: str = "soft", eps: float = 1e-4,
                log_scale: Sequence[float] | None = None) -> torch.Tensor:
    """Per-block coverages (N, K, hw) -> additive attention bias (N, hw, sum(token_counts)), float32.

    Block k covers token_counts[k] consecutive tokens of the context. Block 0 is the fallback
    for rows that would otherwise have no finite entry. log_scale (K,): log of each block's region
    weight, added where the block is read (a weight scales the logits, not the coverage).
    """
    if weights.shape[1] != len(token_counts):
        raise ValueError(f"{weights.shape[1]} coverage blocks but {len(token_counts)} token blocks")
    weights = weights.float()
    neg_inf = torch.tensor(float("-inf"), device=weights.device)
    if mode == "hard":
        blocks = torch.where(weights >= 0.5, torch.zeros((), device=weights.device), neg_inf)
    else:
        blocks = torch.where(weights > eps, weights.clamp_min(eps).log(), neg_inf)
    dead = torch.isinf(blocks).all(dim=1)  # (N, hw)
    blocks[:, 0] = blocks[:, 0].masked_fill(dead, 0.0)
    if log_scale is not None and any(log_scale):
        blocks = blocks + torch.as_tensor(list(log_scale), dtype=blocks.dtype, device=blocks.device)[None, :, None]
    counts = torch.as_tensor(list(token_counts), device=weights.device)
    return blocks.transpose(1, 2).repeat_interleave(counts, dim=-1).contiguous()


def normalize_block_mass(q: torch.Tensor, k: torch.Tensor, heads: int, bias: torch.Tensor,
                         block_ids: torch.Tensor, blocks: int, other_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-mode bias (B, hw, L) -> (B, heads, hw, L) whose softmax gives each block exactly the
    mass its coverage says.

    With B = log M_r alone, block r gets mass M_r Z_r / sum_s M_s Z_s, where Z_r = sum over r's
    tokens of exp(q k / sqrt(d)): a prompt whose keys match the pixel better wins whatever the
    opacity, so a 50 % brush shows one prompt or the other. Subtracting log Z_r (per head and
    pixel) leaves mass M_r / sum_s M_s = M_r: the attention output becomes the coverage-weighted
    mix of each prompt's own attention, linear in opacity. Where one block is active (painted at
    100 %, or background) the shift is a constant of the row and changes nothing.
    q (B, hw, heads*d) or (B, heads, hw, d); k likewise over L tokens; block_ids (B or 1, L);
    other_mask: another patch's float mask over the same tokens (B, hw, L), part of the logits.
    """
    if q.ndim == 3:
        b, n, inner = q.shape
        d = inner // heads
        q = q.reshape(b, n, heads, d).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(1, 2)
    d = q.shape[-1]
    logits = torch.matmul(q.float() * d ** -0.5, k.float().transpose(-1, -2))  # (B, heads, hw, L)
    logits = logits + torch.where(torch.isinf(bias), bias, torch.zeros((), device=bias.device))[:, None].float()
    if other_mask is not None:
        logits = logits + other_mask[:, None].float()
    # per-block sums of the softmax (Z_r over the row's Z; the common factor cancels below) and the
    # gather back to tokens as products with a one-hot (tokens x blocks) matrix: one fused softmax
    # and two matmuls instead of max / sub / exp and a scatter / gather (much faster on CPU)
    onehot = F.one_hot(block_ids.long(), blocks + 1).to(torch.float32)[:, None]  # (B or 1, 1, L, blocks + 1)
    sums = torch.matmul(torch.softmax(logits, dim=-1), onehot)
    log_z = sums.clamp_min(1e-30).log()  # (B, heads, hw, blocks + 1), relative to the row's Z
    active = sums > 0
    # a row with one active block needs no shift (a row constant): keep its bias exactly, as hard
    # partitions and full-canvas regions must reproduce plain attention bit for bit
    mixed = active.sum(-1, keepdim=True) > 1
    log_z = torch.where(active, log_z - log_z.masked_fill(~active, float("-inf")).amax(-1, keepdim=True), 0.0)
    shift = torch.matmul(torch.where(mixed, log_z, torch.zeros((), device=log_z.device)), onehot.transpose(-1, -2))
    out = bias[:, None].float() - shift
    return out if other_mask is None else out + other_mask[:, None].float()


def cross_attention_layers(unet: torch.nn.Module) -> dict[LayerKey, torch.nn.Module]:
    """The attn2 modules of a ComfyUI-style UNet (input_blocks / middle_block / output_blocks),
    keyed as its forward names them in transformer_options: (kind, block id, transformer index)."""
    layers: dict[LayerKey, torch.nn.Module] = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[-1] != "attn2" or "transformer_blocks" not in parts:
            continue
        index = int(parts[parts.index("transformer_blocks") + 1])
        if parts[0] == "input_blocks":
            key = ("input", int(parts[1]), index)
        elif parts[0] == "output_blocks":
            key = ("output", int(parts[1]), index)
        elif parts[0] == "middle_block":
            key = ("middle", 0, index)
        else:
            continue
        layers[key] = module
    return layers


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _weight_token(linear: torch.nn.Module) -> tuple:
    """What makes a projection's output change: the weight object, its in-place edits and
    ComfyUI's on-the-fly weight functions (LoRA in low-VRAM mode)."""
    w = linear.weight
    return (weakref.ref(w), _version(w), tuple(id(f) for f in getattr(linear, "weight_function", ()) or ()))


def _same_token(a: tuple, b: tuple) -> bool:
    return a[0]() is b[0]() and a[1:] == b[1:]


class PreparedPalette:
    """A palette made ready for attention: its mask pyramid, its region contexts concatenated,
    and caches of their per-layer K/V projections and of the biases per resolution.

    The extra tokens are [region 1 .. region P prompts] + [the regions' own negative prompts].
    """

    def __init__(self, palette: Palette, pyramid: MaskPyramid | None = None, mode: str = "soft",
                 lora: "RegionalLoRA | None" = None) -> None:
        if pyramid is None:
            pyramid = MaskPyramid(palette.region_coverage(), "nearest" if mode == "hard" else "area")
        elif pyramid.regions != len(palette.regions) or pyramid.canvas_size != (palette.height, palette.width):
            raise PaletteError(
                f"the mask pyramid ({pyramid.regions} regions, canvas {pyramid.canvas_size[1]} x {pyramid.canvas_size[0]}) "
                f"was not made from this palette ({len(palette.regions)} regions, canvas {palette.width} x {palette.height})")
        self.palette = palette
        self.pyramid = pyramid
        regions = palette.regions
        self.negative_regions = [i for i, r in enumerate(regions) if r.negative_context is not None]
        contexts = [r.context for r in regions] + [regions[i].negative_context for i in self.negative_regions]
        self.context = torch.cat(contexts, dim=1)  # (1, extra tokens, D)
        self.token_counts = [r.context.shape[1] for r in regions]
        self.negative_counts = [regions[i].negative_context.shape[1] for i in self.negative_regions]
        # cond rows: each region prompt's logits scaled by its weight; negatives and uncond rows unweighted
        self.log_weights = {0: [0.0] + [math.log(r.spec.weight) for r in regions] + [0.0] * len(self.negative_counts),
                            1: None}
        self._kv: dict[tuple, tuple] = {}
        self._bias: dict[tuple, dict[int, torch.Tensor]] = {}
        # region LoRAs: (token span of the region's prompt in self.context, its LoRA), one per pair
        self.lora = lora
        starts = [sum(self.token_counts[:i]) for i in range(len(regions))]
        self.lora_spans = [((start, start + count), l) for start, count, r in zip(starts, self.token_counts, regions)
                           for l in r.spec.loras]
        if self.lora_spans:
            if lora is None:
                raise PaletteError("this palette has region LoRAs, which RCCA applies on SD1.5 / SDXL models")
            lora.check(l for _, l in self.lora_spans)  # a bad file is reported now, before any sampling

    def lora_pairs(self, index: int) -> list:
        """(lora, coverage (H, W) at canvas size) of every region LoRA for mask set `index`."""
        cov = self.palette.region_coverage()
        i = index if cov.shape[0] > 1 else 0
        return [(l, cov[i, r]) for r, region in enumerate(self.palette.regions) for l in region.spec.loras]

    @property
    def extra_tokens(self) -> int:
        return int(self.context.shape[1])

    @property
    def blocks(self) -> int:
        """Token blocks of the full context: the layer's own, the regions', their negatives'."""
        return 1 + len(self.token_counts) + len(self.negative_counts)

    def block_ids(self, own: int, length: int, device: torch.device) -> torch.Tensor:
        """(length,) block index of every token of [own | extra | padding]; padding gets one id past the last block."""
        counts = [own] + self.token_counts + self.negative_counts
        ids = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        return F.pad(ids, (0, length - ids.shape[0]), value=len(counts))

    @property
    def samples(self) -> int:
        return self.pyramid.samples

    def extra_kv(self, key: LayerKey, layer: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        """(K, V) of the extra tokens at one layer, (1, extra tokens, inner); projected once while
        the layer's weights are unchanged."""
        token = (_weight_token(layer.to_k), _weight_token(layer.to_v))
        hit = self._kv.get((key, dtype, device))
        if hit is None or not (_same_token(hit[0][0], token[0]) and _same_token(hit[0][1], token[1])):
            with torch.no_grad():
                ctx = self.context.to(device=device, dtype=dtype)
                k, v = layer.to_k(ctx), layer.to_v(ctx)
                if self.lora is not None and self.lora_spans:
                    k, v = add_kv_deltas(k, v, ctx, [span for span, _ in self.lora_spans],
                                         [self.lora.kv_delta(key, lora) for _, lora in self.lora_spans],
                                         layer.to_k, layer.to_v)
                hit = (token, k, v)
            self._kv[(key, dtype, device)] = hit
        return hit[1], hit[2]

    def block_weights(self, level: torch.Tensor) -> dict[int, torch.Tensor]:
        """Coverages (N, 1 + P, hw) -> each token block's weight (N, blocks, hw) for cond rows (0)
        and uncond rows (1). Cond rows read the background and the region prompts; uncond rows
        read a region's own negative inside it and the shared negative (block 0) elsewhere."""
        zeros = torch.zeros_like(level[:, :1])
        negatives = level[:, [1 + i for i in self.negative_regions]]
        cond_w = torch.cat([level, zeros.expand(-1, len(self.negative_counts), -1)], dim=1)
        if self.negative_regions:
            shared = level.sum(dim=1, keepdim=True) - negatives.sum(dim=1, keepdim=True)
        else:
            shared = torch.ones_like(zeros)
        uncond_w = torch.cat([shared, zeros.expand(-1, len(self.token_counts), -1), negatives], dim=1)
        return {0: cond_w, 1: uncond_w}

    def bias(self, h: int, w: int, own: int, mode: str, eps: float, device: torch.device) -> dict[int, torch.Tensor]:
        """Float32 bias (N, hw, own + extra tokens) for cond rows (0) and uncond rows (1)."""
        cache_key = (h, w, own, mode, eps, device)
        hit = self._bias.get(cache_key)
        if hit is not None:
            return hit
        counts = [own] + self.token_counts + self.negative_counts
        hit = {kind: region_bias(weights, counts, mode, eps, self.log_weights[kind])
               for kind, weights in self.block_weights(self.pyramid.level(h, w).to(device)).items()}
        if len(self._bias) > 32:
            self._bias.clear()
        self._bias[cache_key] = hit
        return hit


class ChainedOverride:
    """An `optimized_attention_override` that keeps the override it replaced (another pack's) and
    calls it in turn, so both act on every attention call."""

    previous_override: Callable[..., Any] | None = None

    def _call(self, func, args, kwargs):
        if self.previous_override is not None:
            return self.previous_override(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _restore_override(self, transformer_options: dict) -> None:
        if self.previous_override is not None:
            transformer_options["optimized_attention_override"] = self.previous_override
        else:
            transformer_options.pop("optimized_attention_override", None)


class RegionalCrossAttention(ChainedOverride):
    """RCCA as ComfyUI hooks.

    - `attn2_patch` (an attn2_patch list entry) arms the next attention call when the layer,
      block and sigma are selected; it changes nothing else, so other packs' patches compose.
    - `attention_override` (transformer_options["optimized_attention_override"]) consumes the
      arming: it appends the cached region K/V to the layer's own K/V and passes the bias as
      the attention mask to whatever attention function ComfyUI (or an earlier override) uses.
    - `attn2_output_patch` raises when the arming is still there after attn2: another pack's
      attn2 replacement (or an override that does not chain) bypassed RCCA, which must never
      be silently off. `attn1_patch` disarms too, so a stale arming left by an exception can
      never reach a self-attention.

    Rows are laid out as ComfyUI batches them: chunks listed in cond_or_uncond (0 = cond,
    1 = uncond), each holding the n latents; the layout is read at the attention call, after
    other packs' attn2 patches may have expanded the batch (see `row_layout`). Cond rows get region-constrained attention;
    uncond rows keep their own context unmasked, unless regions carry negative prompts, which
    then constrain the uncond rows the same way (regions without one use the shared negative).

    Every latent uses the patch's palette, unless the caller puts a tuple of n PreparedPalette
    under transformer_options["rcca_rows"]: then latent i uses rows[i] (a stream batch, where
    every slot belongs to a different frame with its own palette).
    """

    ROWS_KEY = "rcca_rows"

    def __init__(self, palette: Palette | PreparedPalette, layers: Mapping[LayerKey, torch.nn.Module],
                 options: RCCAOptions = RCCAOptions(), pyramid: MaskPyramid | None = None,
                 previous_override: Callable[..., Any] | None = None, lora: RegionalLoRA | None = None) -> None:
        self.lora = lora
        self.default = palette if isinstance(palette, PreparedPalette) else \
            PreparedPalette(palette, pyramid, options.mode, lora)
        self.options = options
        self.layers = dict(layers)
        self.previous_override = previous_override
        self._armed: tuple | None = None
        self._sigma_obj: Any = None
        self._sigma_active = True
        self._rows_cache: dict[tuple, tuple] = {}
        self._bias_cache: dict[tuple, tuple] = {}  # one palette for every latent (the KSampler case)
        self._mixed: dict[int, tuple] = {}  # id(bias) -> (bias, has rows with several active blocks)
        self._pad_cache: dict[tuple, tuple] = {}  # padded copies of cached tensors, keyed by their source
        self.static = False  # always build fixed-shape tick inputs (set when the model is compiled)

    @property
    def palette(self) -> Palette:
        return self.default.palette

    def prepare(self, palette: Palette, pyramid: MaskPyramid | None = None) -> PreparedPalette:
        """A palette ready to be passed per latent under transformer_options["rcca_rows"]."""
        return PreparedPalette(palette, pyramid, self.options.mode, self.lora)

    def lora_rows(self, transformer_options: Mapping, latent_shape: Sequence[int]) -> tuple[list, int] | None:
        """The region LoRAs of one model call: per latent its palette's (LoRA, coverage (H, W))
        pairs, and how many chunks (cond / uncond) the batch holds; None when there are none."""
        if self.lora is None:
            return None
        rows = tuple(transformer_options.get(self.ROWS_KEY) or (self.default,))
        if not any(r.lora_spans for r in rows):  # the usual case, every stream tick: nothing to build
            return None
        _, chunks, n = whole_chunks(transformer_options, int(latent_shape[0]))
        if len(rows) not in (1, n):
            raise PaletteError(f"RCCA: {len(rows)} per-latent palettes for a batch of {n} latents")
        pairs = [rows[i].lora_pairs(0) if len(rows) == n else rows[0].lora_pairs(i) for i in range(n)]
        return (pairs, chunks) if any(pairs) else None

    # -- one model call's inputs, computed on the host before the UNet runs ---------------------
    def with_tick(self, transformer_options: dict, latent_shape: Sequence[int], own: int | None,
                  dtype: torch.dtype, device: torch.device, static: bool | None = None, levels: int = 4) -> dict:
        """transformer_options plus TICK_KEY: everything the hooks need for this model call, as
        tensors (see `tick_inputs`). Call it outside any compiled region, once per model call (an
        APPLY_MODEL wrapper does). Returns the dict unchanged when there is nothing to precompute."""
        tick = self.tick_inputs(transformer_options, latent_shape, own, dtype, device, static, levels)
        if tick is None:
            return transformer_options
        return {**transformer_options, TICK_KEY: tick}

    def tick_inputs(self, transformer_options: Mapping, latent_shape: Sequence[int], own: int | None,
                    dtype: torch.dtype, device: torch.device, static: bool | None = None, levels: int = 4) -> dict | None:
        """The host logic of one model call: the sigma range, the row layout, every row's palette,
        the caches keyed by object identity and weight versions, the check for mixed rows. What
        the hooks then read is a dict of tensors and constants:

        - "kv": {layer key: (K, V)} of the extra tokens, (rows, bucket, inner), padded to
          `token_bucket` with keys whose bias is -inf (static only);
        - "bias": {(h, w): (rows, hw, own + bucket)} in `dtype`, for every UNet level of the latent;
        - "ids": block index of every token (padding: the last slot), "blocks": slots - 1;
        - "self": {(h, w): (rows, hw, hw)} when self-attention keeps to regions;
        - "layout", "latents", "own", "cross", "mixed".

        static (default: self.static): shapes and constants do not depend on the palette or the
        sigma, so a compiled graph is reused across palette edits within the bucket: outside the
        sigma range the bias masks the extra tokens instead of leaving them out, and soft mode
        always normalises (exact on rows with one active block).
        """
        if own is None or not self.layers:
            return None
        static = self.static if static is None else bool(static)
        split = call_layout(transformer_options, int(latent_shape[0]))
        if split is None or len(split[0]) != split[1]:
            return None  # the hooks' own path reports what is wrong
        layout, _, n = split
        rows = tuple(transformer_options.get(self.ROWS_KEY) or (self.default,))
        sigmas = transformer_options.get("sigmas")
        top = float(sigmas.max()) if sigmas is not None and not (self.options.full_range and
                                                                   math.isinf(self.options.self_sigma_end)) else None
        cross_on = self.options.full_range or top is None or self.options.sigma_end <= top <= self.options.sigma_start
        self_wanted = not math.isinf(self.options.self_sigma_end)
        self_on = self_wanted and (top is None or top >= self.options.self_sigma_end)
        selected = [key for key in self.layers if self.options.applies_to(key[0], key[1])]
        tick: dict[str, Any] = {"layout": layout, "latents": n, "own": int(own), "cross": bool(cross_on or static),
                                "kv": {}, "bias": {}, "mixed": {}, "self": {}}
        sizes = unet_level_sizes(int(latent_shape[-2]), int(latent_shape[-1]), levels)
        batch = len(layout) * n
        if tick["cross"] and selected:
            first = selected[0]
            extras = {size: self._extras(first, size[0], size[1], own, layout, rows, n, dtype, device) for size in sizes}
            _, _, _, ids, blocks = extras[sizes[0]]
            extra = ids.shape[-1] - own
            bucket = token_bucket(extra) if static else extra
            # block slots (padding last): static, as many as any palette can have (own + regions + their negatives)
            slots = max(2 + 2 * MAX_REGIONS, blocks + 1) if static else blocks + 1
            pad_id = slots - 1
            ids = torch.where(ids >= blocks, torch.full((), pad_id, device=ids.device), ids)
            tick["ids"] = self._padded(("ids", bucket, pad_id), ids, bucket - extra, pad_id, dim=-1)
            tick["blocks"] = pad_id
            for key in selected:
                k, v, _, _, _ = self._extras(key, sizes[0][0], sizes[0][1], own, layout, rows, n, dtype, device)
                if k.shape[0] == batch and k.stride(0) == 0:  # one palette: pad one row, expand
                    k, v = k[:1], v[:1]
                k = self._padded(("k", key, bucket), k, bucket - extra, 0.0, dim=1)
                v = self._padded(("v", key, bucket), v, bucket - extra, 0.0, dim=1)
                tick["kv"][key] = (k.expand(batch, -1, -1), v.expand(batch, -1, -1))
            for size, (_, _, bias, _, _) in extras.items():
                if cross_on:
                    tick["mixed"][size] = True if static else self._has_mixed_rows(bias, extras[size][3], blocks)
                    bias = self._padded(("bias", size, bucket), bias, bucket - extra, float("-inf"), dim=-1)
                else:  # static, outside the sigma range: the background prompt alone
                    tag = ("off", size, bucket, tuple(bias.shape[:-1]), own, bias.dtype, bias.device)
                    hit = self._pad_cache.get(tag)
                    if hit is None:
                        off = torch.zeros(*bias.shape[:-1], own + bucket, dtype=bias.dtype, device=bias.device)
                        off[..., own:] = float("-inf")
                        hit = self._pad_cache[tag] = (None, off)
                    bias = hit[1]
                    tick["mixed"][size] = True
                tick["bias"][size] = bias
        if self_wanted and (self_on or static) and selected:
            for h, w in sizes:
                if self_on:
                    tick["self"][(h, w)] = self._self_bias(h, w, layout, rows, n, device).to(dtype)
                else:
                    hit = self._pad_cache.get(("self-off", h, w, batch, dtype, device))
                    if hit is None:
                        hit = self._pad_cache[("self-off", h, w, batch, dtype, device)] = (
                            None, torch.zeros((), dtype=dtype, device=device).expand(batch, h * w, h * w))
                    tick["self"][(h, w)] = hit[1]
        return tick

    def _padded(self, tag: tuple, src: torch.Tensor, pad: int, value: float, dim: int) -> torch.Tensor:
        """src padded by `pad` entries of `value` along dim (-1 or 1); cached while src is the same object."""
        if pad <= 0:
            return src
        tag = tag + (src.dtype, src.device, tuple(src.shape))
        hit = self._pad_cache.get(tag)
        if hit is not None and hit[0] is src:
            return hit[1]
        spec = (0, pad) if dim == -1 else (0, 0, 0, pad)
        out = F.pad(src, spec, value=value)
        if len(self._pad_cache) > 256:
            self._pad_cache.clear()
        self._pad_cache[tag] = (src, out)
        return out

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options, and with them our bound hooks; a copy
        # would duplicate the UNet layers we reference. The object is shared by design: its
        # configuration is immutable and its caches stay valid for every clone.
        return self

    # -- ComfyUI hooks ------------------------------------------------------------------
    def attn1_patch(self, n, context, value, extra_options):
        self._armed = None
        if math.isinf(self.options.self_sigma_end):
            return n, context, value
        tick = extra_options.get(TICK_KEY)
        if tick is not None:  # precomputed on the host: no reads of tensors here
            if tick["self"]:
                armed = self._arming(extra_options, tick)
                if armed is not None:
                    self._armed = ("self",) + armed
            return n, context, value
        armed = self._arming(extra_options)
        sigmas = extra_options.get("sigmas")
        if armed is not None and (sigmas is None or float(sigmas.max()) >= self.options.self_sigma_end):
            self._armed = ("self",) + armed
        return n, context, value

    def attn2_patch(self, n, context, value, extra_options):
        self._armed = None
        tick = extra_options.get(TICK_KEY)
        if tick is not None:
            if tick["cross"]:
                armed = self._arming(extra_options, tick)
                if armed is not None:
                    self._armed = ("cross",) + armed
            return n, context, value
        armed = self._arming(extra_options)
        if armed is not None and self._sigma_in_range(extra_options.get("sigmas")):
            self._armed = ("cross",) + armed
        return n, context, value

    def _arming(self, extra_options, tick: dict | None = None) -> tuple | None:
        """(layer key, h, w, latents, cond_or_uncond, rows, tick) of a selected layer, else None.
        With a tick, rows stay unread (None): the palettes were read on the host."""
        block = extra_options.get("block")
        shape = extra_options.get("activations_shape")
        if block is None or shape is None or not self.options.applies_to(block[0], block[1]):
            return None
        key = (block[0], block[1], extra_options.get("block_index", 0))
        if key not in self.layers:
            raise PaletteError(f"RCCA: no cross-attention layer {key} in this model; the patch supports SD1.5 and SDXL UNets")
        cond_or_uncond = tuple(extra_options.get("cond_or_uncond") or (0,))
        # uuids has one entry per chunk ComfyUI batched and, unlike cond_or_uncond, no patch edits it
        chunks = len(extra_options.get("uuids") or cond_or_uncond)
        latents = int(shape[0]) // chunks
        rows = None if tick is not None else tuple(extra_options.get(self.ROWS_KEY) or (self.default,))
        return key, int(shape[-2]), int(shape[-1]), latents, cond_or_uncond, rows, tick

    def attn2_output_patch(self, out, extra_options):
        # still armed after attn2 ran: the layer's attention never reached our override, because
        # another pack replaced it (attn2_replace) or took the override slot without chaining it
        if self._armed is not None:
            key = self._armed[1]
            self._armed = None
            raise PaletteError(
                f"RCCA Attention Patch cannot act at cross-attention layer {key}: another node replaced that "
                "layer's attention (an attn2_replace patch, as DenseDiffusion or IPAdapter do, or an attention "
                "override that does not call the one before it) and the replacement ignores RCCA. Use one of the "
                "two on this model, or leave the replaced layers out of RCCA with its 'blocks' input")
        return out

    def attention_override(self, func, *args, **kwargs):
        armed, self._armed = self._armed, None
        if armed is None:
            return self._call(func, args, kwargs)
        kind, key, h, w, latents, armed_layout, rows, tick = armed
        q, k, v, heads = args[:4]
        mask = args[4] if len(args) > 4 else kwargs.pop("mask", None)
        split_heads = k.ndim == 4  # skip_reshape callers pass (B, heads, L, d)
        tokens = q.shape[2] if split_heads else q.shape[1]
        if tokens != h * w:
            raise PaletteError(f"RCCA: attention layer {key} has {tokens} queries but activations are {h} x {w}; "
                               "another patch changed the layer's input, which RCCA cannot follow")
        own = k.shape[2] if split_heads else k.shape[1]
        live = (kwargs.get("transformer_options") or {}).get("cond_or_uncond")
        layout = row_layout(int(q.shape[0]), latents, armed_layout, live)
        ticked = tick is not None and layout == tick["layout"] and own == tick["own"] and \
            (h, w) in (tick["self"] if kind == "self" else tick["bias"]) and (kind == "self" or key in tick["kv"])
        if tick is not None and not ticked:
            if _compiling():
                raise PaletteError(f"RCCA: layer {key} ({h} x {w}, {own} own tokens, rows {list(layout)}) does not match "
                                   f"the inputs precomputed for this model call (rows {list(tick['layout'])}, {tick['own']} "
                                   "own tokens); another patch changed the layer, which a compiled model cannot follow. "
                                   "Run the model eager")
            # eager: another patch changed the layer after the tick was made; read the palettes here
            rows = tuple((kwargs.get("transformer_options") or {}).get(self.ROWS_KEY) or (self.default,))
        if kind == "self":
            # from the tick: no host reads, no caches, nothing keyed on object identity
            bias = tick["self"][(h, w)] if ticked else self._self_bias(h, w, layout, rows, latents, q.device).to(q.dtype)
            if mask is not None:
                bias = bias + _as_float_mask(mask, own, bias)
            kwargs["mask"] = bias
            return self._call(func, (q, k, v, heads) + tuple(args[5:]), kwargs)
        normalize = self.options.mode == "soft" and self.options.normalize
        if ticked:
            k_extra, v_extra = tick["kv"][key]
            bias, block_ids, blocks = tick["bias"][(h, w)], tick["ids"], tick["blocks"]
            mixed = normalize and tick["mixed"][(h, w)]
        else:
            k_extra, v_extra, bias, block_ids, blocks = self._extras(key, h, w, own, layout, rows, latents, q.dtype, q.device)
            mixed = normalize and self._has_mixed_rows(bias, block_ids, blocks)
        other = _as_float_mask(mask, own, bias) if mask is not None else None
        if split_heads:
            k_extra, v_extra = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (k_extra, v_extra))
        seq = 2 if split_heads else 1
        k = torch.cat([k, k_extra.to(k.dtype)], dim=seq)
        v = torch.cat([v, v_extra.to(v.dtype)], dim=seq)
        if mixed:
            bias = normalize_block_mass(q, k, heads, bias, block_ids, blocks, other).to(q.dtype)
        elif other is not None:
            bias = bias + other
        kwargs["mask"] = bias
        return self._call(func, (q, k, v, heads) + tuple(args[5:]), kwargs)

    def install(self, model_options: dict) -> None:
        """Register the hooks in a (cloned) ComfyUI model_options dict."""
        to = model_options.setdefault("transformer_options", {})
        patches = to.setdefault("patches", {})
        patches["attn1_patch"] = patches.get("attn1_patch", []) + [self.attn1_patch]
        patches["attn2_patch"] = patches.get("attn2_patch", []) + [self.attn2_patch]
        patches["attn2_output_patch"] = patches.get("attn2_output_patch", []) + [self.attn2_output_patch]
        to["optimized_attention_override"] = self.attention_override

    def uninstall(self, model_options: dict) -> None:
        """Remove these hooks from a (cloned) model_options, restoring an earlier override."""
        to = model_options.get("transformer_options", {})
        patches = to.get("patches", {})
        for name in ("attn1_patch", "attn2_patch", "attn2_output_patch"):
            if name in patches:
                patches[name] = [p for p in patches[name] if getattr(p, "__self__", None) is not self]
        self._restore_override(to)

    @classmethod
    def installed_in(cls, model_options: dict) -> "RegionalCrossAttention | None":
        """The RCCA hooks already registered in model_options, if any."""
        for patch in model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", []):
            owner = getattr(patch, "__self__", None)
            if isinstance(owner, cls):
                return owner
        return None

    # -- internals ------------------------------------------------------------------------
    def _sigma_in_range(self, sigmas) -> bool:
        if self.options.full_range or sigmas is None:
            return True
        if sigmas is not self._sigma_obj:  # one host read per model call, not per layer
            s = float(sigmas.max())
            self._sigma_obj = sigmas
            self._sigma_active = self.options.sigma_end <= s <= self.options.sigma_start
        return self._sigma_active

    def _has_mixed_rows(self, bias: torch.Tensor, block_ids: torch.Tensor, blocks: int) -> bool:
        """Whether any pixel attends to two or more blocks (soft edges, opacity, overlaps); only those
        need normalize_block_mass. Read once per cached bias, so no host sync per layer call."""
        hit = self._mixed.get(id(bias))
        if hit is not None and hit[0] is bias:
            return hit[1]
        finite = torch.isfinite(bias).to(torch.float32)
        ids = block_ids.expand(bias.shape[0], -1)[:, None, :].expand(bias.shape)
        per_block = torch.zeros(*bias.shape[:-1], blocks + 1, device=bias.device).scatter_add_(-1, ids, finite)
        mixed = bool(((per_block > 0).sum(-1) > 1).any())
        if len(self._mixed) > 64:
            self._mixed.clear()
        self._mixed[id(bias)] = (bias, mixed)
        return mixed

    def _self_bias(self, h, w, cond_or_uncond, rows, n, device) -> torch.Tensor:
        """(rows, hw, hw) self-attention bias: log of the chance that two pixels lie in the same
        region, S(p, p') = sum_k M_k(p) M_k(p') over the background and every region (0 / -inf for
        hard partitions; S(p, p) > 0, so no row is empty). Uncond rows stay unmasked."""
        cache_key = ("self", h, w, cond_or_uncond, n, tuple(id(r) for r in rows), device)
        hit = self._bias_cache.get(cache_key)
        if hit is not None and all(a is b for a, b in zip(hit[0], rows)):
            return hit[1]
        levels = [r.pyramid.level(h, w).to(device) for r in rows]  # each (N, K, hw)
        level = levels[0].expand(n, -1, -1) if len(rows) == 1 else torch.cat(levels)
        same = torch.einsum("nkp,nkq->npq", level, level)
        cond = torch.where(same > self.options.eps, same.clamp_min(self.options.eps).log(),
                           torch.full((), float("-inf"), device=device))
        uncond = torch.zeros_like(cond)
        bias = torch.cat([uncond if c == 1 else cond for c in cond_or_uncond], dim=0)
        if len(self._bias_cache) > 32:
            self._bias_cache.clear()
        self._bias_cache[cache_key] = (tuple(rows), bias)
        return bias

    def _extras(self, key, h, w, own, cond_or_uncond, rows, n, dtype, device):
        """Extra K, V (rows, Lx, inner) and the bias (rows, hw, own + Lx) in the attention dtype,
        for len(cond_or_uncond) chunks of n latents."""
        batch = len(cond_or_uncond) * n
        layer = self.layers[key]
        if len(rows) == 1:
            prepared = rows[0]
            if prepared.samples not in (1, n):
                raise PaletteError(f"the palette has {prepared.samples} mask sets but the latent batch has {n} latents; "
                                   "give one mask per region, or a mask batch of the latent batch size")
            k_extra, v_extra = prepared.extra_kv(key, layer, dtype, device)
            cache_key = (h, w, own, cond_or_uncond, n, dtype, device)
            hit = self._bias_cache.get(cache_key)
            if hit is None or hit[0] is not prepared:
                per_kind = {kind: b.expand(n, -1, -1) for kind, b in
                            prepared.bias(h, w, own, self.options.mode, self.options.eps, device).items()}
                bias = torch.cat([per_kind[1 if c == 1 else 0] for c in cond_or_uncond], dim=0).to(dtype)
                if len(self._bias_cache) > 32:
                    self._bias_cache.clear()
                hit = self._bias_cache[cache_key] = (prepared, bias)
            ids = prepared.block_ids(own, own + prepared.extra_tokens, device)[None]
            return k_extra.expand(batch, -1, -1), v_extra.expand(batch, -1, -1), hit[1], ids, prepared.blocks
        return self._per_latent_extras(key, layer, h, w, own, cond_or_uncond, rows, n, dtype, device)

    def _per_latent_extras(self, key, layer, h, w, own, cond_or_uncond, rows, n, dtype, device):
        """Latent i attends with rows[i]'s palette: extra tokens padded to the longest palette,
        padding masked with -inf. Cached per combination of palettes, which changes only when
        a palette edit enters or leaves the stream."""
        if len(rows) != n:
            raise PaletteError(f"RCCA: {len(rows)} per-latent palettes for a batch of {n} latents")
        cache_key = (key, h, w, own, cond_or_uncond, tuple(id(r) for r in rows), dtype, device)
        hit = self._rows_cache.get(cache_key)
        if hit is not None and all(a is b for a, b in zip(hit[0], rows)):
            return hit[1:]
        longest = max(r.extra_tokens for r in rows)
        ks, vs, biases = [], [], {0: [], 1: []}
        for prepared in rows:
            if prepared.samples != 1:
                raise PaletteError("a per-latent palette must carry one mask set, got "
                                   f"{prepared.samples}")
            k_extra, v_extra = prepared.extra_kv(key, layer, dtype, device)
            pad = longest - prepared.extra_tokens
            ks.append(F.pad(k_extra, (0, 0, 0, pad)))
            vs.append(F.pad(v_extra, (0, 0, 0, pad)))
            for kind, b in prepared.bias(h, w, own, self.options.mode, self.options.eps, device).items():
                biases[kind].append(F.pad(b, (0, pad), value=float("-inf")))
        k_rows, v_rows = torch.cat(ks), torch.cat(vs)
        per_kind = {kind: torch.cat(bs) for kind, bs in biases.items()}
        bias = torch.cat([per_kind[1 if c == 1 else 0] for c in cond_or_uncond], dim=0).to(dtype)
        blocks = max(r.blocks for r in rows)
        ids = torch.stack([r.block_ids(own, own + longest, device).clamp_max(blocks) for r in rows])
        result = (k_rows.repeat(len(cond_or_uncond), 1, 1), v_rows.repeat(len(cond_or_uncond), 1, 1), bias,
                  ids.repeat(len(cond_or_uncond), 1), blocks)
        if len(self._rows_cache) > 256:
            self._rows_cache.clear()
        self._rows_cache[cache_key] = (tuple(rows),) + result
        return result


def _as_float_mask(mask: torch.Tensor, own: int, bias: torch.Tensor) -> torch.Tensor:
    """Another patch's mask over the layer's own tokens, padded with zeros for the region tokens."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, float("-inf"))
    mask = mask.to(bias.dtype)
    if mask.shape[-1] != own:
        raise PaletteError(f"RCCA: an attention mask over {mask.shape[-1]} tokens cannot be combined with a layer of {own} tokens")
    if mask.ndim == 4:  # (B, heads, hw, L): fold heads only if they agree
        if mask.shape[1] != 1:
            raise PaletteError("RCCA: per-head attention masks from another patch are not supported")
        mask = mask[:, 0]
    return F.pad(mask, (0, bias.shape[-1] - own))
