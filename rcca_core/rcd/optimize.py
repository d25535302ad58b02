"""RCD (b)+(c) on the latent: attention capture in the UNet and the gradient steps.

During the first t_f sampler steps, before the step's first model evaluation, RCD takes k
gradient steps on the latent:

    L = L_FD + delta * L_AC,    delta = options.delta before step t_A, 0 from t_A on
    x <- x - s * (1 + sigma^2) * dL/dx

The paper's step s is for the DDPM latent z_t = x / sqrt(1 + sigma^2) (ComfyUI's k-diffusion
x = x0 + sigma * eps; the UNet sees z_t), so dL/dz = sqrt(1 + sigma^2) dL/dx and the update
of z by s * dL/dz is an update of x by s * (1 + sigma^2) * dL/dx.

Attention maps (design.md, "RCD, exactly"): A_i is the cross-attention of subject i's noun
token at the layers whose resolution is 1/4 of the latent's (16 x 16 for SD1.5 at 512 px; the
coarsest available level on smaller UNets), probabilities averaged over those layers and the
heads, restricted to the prompt's word tokens (no start, end or padding token), scaled by
100 and softmaxed again over those tokens (Attend-and-Excite's pre-processing, which RCD
follows), then taken at the noun's column: (B, N, h, w) float32. The losses smooth and
normalise them (losses.attention_control_terms).

``AttentionCapture`` gets them through ComfyUI's composable hooks (an attn2_patch list entry
arms, the optimized_attention_override records and calls the previous override, an
attn1_patch disarms), so RCCA and other packs' patches keep working; it also records the
down-block transformer outputs for distillation through an input_block_patch. In the
optimisation forward it stops the UNet right after the last attention layer it needs
(``CaptureDone``), so the high-resolution decoder blocks run neither forward nor backward, and
it routes attention through PyTorch SDPA (autograd-capable whatever ComfyUI's attention
backend is; inference-mode tensors from caches are cloned first).

``LatentOptimizer`` does the steps for one sampling run; the UNet call is a function the
caller passes in (ComfyUI glue lives in nodes/rcd.py). Never imports ComfyUI.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..attention import LayerKey, cross_attention_layers
from .distill import TeacherFeatures, subject_masks
from .losses import RCDLossConfig, attention_control_terms, feature_distillation_loss, gaussian_smooth, mask_average_pool

KIND_ORDER = {"input": 0, "middle": 1, "output": 2}
FD_BLOCKS = ("attention_level", "all_down")

__all__ = [
    "RCDOptions", "RCDError", "LayerPlan", "CaptureDone", "AttentionCapture", "LatentOptimizer", "block_levels",
    "plan_layers", "sdpa_attention", "parse_thresholds", "forward_order", "FD_BLOCKS",
]


class RCDError(ValueError):
    """RCD cannot run as configured (message says why and what to do)."""


def parse_thresholds(text: str) -> tuple[tuple[int, float], ...]:
    """'0:0.05, 10:0.5, 20:0.8' -> ((0, 0.05), (10, 0.5), (20, 0.8)); '' -> ()."""
    out = []
    for part in re.split(r"[,;\n]", text or ""):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*:\s*([0-9]*\.?[0-9]+)", part)
        if m is None:
            raise RCDError(f"refine thresholds: cannot read {part!r}; write 'step:threshold' pairs such as "
                           "'0:0.05, 10:0.5, 20:0.8' (threshold in (0, 1])")
        thr = float(m.group(2))
        if not 0.0 < thr <= 1.0:
            raise RCDError(f"refine thresholds: {thr} at step {m.group(1)} must be in (0, 1]")
        out.append((int(m.group(1)), thr))
    if len({s for s, _ in out}) != len(out):
        raise RCDError(f"refine thresholds: a step is listed twice in {text!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class RCDOptions:
    """Schedule and losses of the latent optimisation (defaults: design.md / the article's code).

    t_f, t_a: sampler step indices (0-based): optimise steps i < t_f; attention control with
    weight ``delta`` for i < t_a, distillation only after. k: gradient steps per optimised step.
    step_size: s in the DDPM latent scale (applied as s * (1 + sigma^2)). refine: A&E-style
    (step, threshold) pairs: at those steps, keep stepping (at most max_refine_iters more)
    until every subject's smoothed map peaks at the threshold or above.
    """

    t_f: int = 25
    t_a: int = 15
    k: int = 1
    step_size: float = 10.0
    delta: float = 1.5
    distill: bool = True
    refine: tuple[tuple[int, float], ...] = ()
    max_refine_iters: int = 20
    loss: RCDLossConfig = field(default_factory=RCDLossConfig)
    attention_level: int = 2  # downsampling steps below the latent: 2 = 1/4 (16 x 16 at 512 px on SD1.5)
    fd_blocks: str = "attention_level"
    temperature: float = 100.0
    early_exit: bool = True
    track_loss: bool = False  # evaluate the loss again after the steps (tests, benchmarks): one more forward

    def __post_init__(self) -> None:
        for name in ("t_f", "t_a", "k", "max_refine_iters", "attention_level"):
            if getattr(self, name) < 0:
                raise RCDError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.step_size >= 0 and math.isfinite(self.step_size)):
            raise RCDError(f"step_size must be finite and >= 0, got {self.step_size}")
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise RCDError(f"delta must be finite and >= 0, got {self.delta}")
        if self.fd_blocks not in FD_BLOCKS:
            raise RCDError(f"fd_blocks must be one of {FD_BLOCKS}, got {self.fd_blocks!r}")
        if self.temperature <= 0:
            raise RCDError(f"temperature must be > 0, got {self.temperature}")

    def delta_at(self, step: int) -> float:
        return self.delta if step < self.t_a else 0.0

    def with_(self, **changes: Any) -> "RCDOptions":
        return replace(self, **changes)


# --------------------------------------------------------------------------- UNet layout

def forward_order(key: LayerKey) -> tuple[int, int, int]:
    return KIND_ORDER[key[0]], key[1], key[2]


def _contains(module: torch.nn.Module, class_name: str) -> bool:
    return any(type(m).__name__ == class_name for m in module.modules())


def block_levels(unet: torch.nn.Module) -> dict[tuple[str, int], int]:
    """Downsampling level of every block of a ComfyUI UNet (input_blocks / middle / output_blocks):
    0 at the latent's resolution, +1 after each Downsample, -1 after each Upsample."""
    if not hasattr(unet, "input_blocks") or not hasattr(unet, "output_blocks"):
        raise RCDError(f"RCD needs a UNet with input_blocks / output_blocks (SD1.5, SDXL); got {type(unet).__name__}")
    levels: dict[tuple[str, int], int] = {}
    level = 0
    for i, block in enumerate(unet.input_blocks):
        if _contains(block, "Downsample"):
            level += 1
        levels[("input", i)] = level
    levels[("middle", 0)] = level
    for j, block in enumerate(unet.output_blocks):
        levels[("output", j)] = level
        if _contains(block, "Upsample"):
            level -= 1
    return levels


@dataclass(frozen=True)
class LayerPlan:
    """Which layers RCD reads: cross-attention maps at one level, down-block outputs for distillation."""

    map_layers: frozenset[LayerKey]
    feature_blocks: frozenset[int]
    level: int

    @property
    def last_map_layer(self) -> LayerKey:
        return max(self.map_layers, key=forward_order)


def plan_layers(unet: torch.nn.Module, attention_level: int = 2, fd_blocks: str = "attention_level") -> LayerPlan:
    """Map layers: the input and output blocks' cross-attention at ``attention_level`` (or the
    deepest level below it that has cross-attention, e.g. on small test UNets). Feature blocks:
    the input blocks with a transformer at that level, or every one ("all_down")."""
    if fd_blocks not in FD_BLOCKS:
        raise RCDError(f"fd_blocks must be one of {FD_BLOCKS}, got {fd_blocks!r}")
    levels = block_levels(unet)
    layers = [k for k in cross_attention_layers(unet) if k[0] != "middle" and k[:2] in levels]
    if not layers:
        raise RCDError("this UNet has no cross-attention in its input / output blocks; RCD supports SD1.5 and SDXL")
    available = sorted({levels[k[:2]] for k in layers})
    below = [lv for lv in available if lv <= attention_level]
    level = max(below) if below else min(available)
    maps = frozenset(k for k in layers if levels[k[:2]] == level)
    down = [k for k in layers if k[0] == "input"]
    if fd_blocks == "attention_level":
        blocks = frozenset(k[1] for k in down if levels[k[:2]] == level)
    else:
        blocks = frozenset(k[1] for k in down)
    return LayerPlan(maps, blocks, level)


# --------------------------------------------------------------------------- attention

def _normal(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def sdpa_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):
    """ComfyUI's attention call signature on torch SDPA, safe under autograd: inference-mode
    inputs (cached K/V, masks) are cloned into ordinary tensors when gradients are on."""
    if torch.is_grad_enabled():
        q, k, v, mask = (_normal(t) for t in (q, k, v, mask))
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, inner = q.shape
        d = inner // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * d)
    return out


def _cond_rows(batch: int, cond_or_uncond: Sequence[int] | None) -> slice | None:
    chunks = list(cond_or_uncond or (0,))
    if 0 not in chunks or batch % len(chunks):
        return None
    n = batch // len(chunks)
    c = chunks.index(0)
    return slice(c * n, (c + 1) * n)


class CaptureDone(Exception):
    """Raised by AttentionCapture after the last layer it needs, to end an optimisation forward early."""


class AttentionCapture:
    """Records subject attention maps and down-block outputs of the conditional rows.

    Install with ``install(model_options)``; record with ``start()`` ... ``result()``. Between
    those, every armed cross-attention call at a map layer adds its head-averaged attention
    probabilities over the word tokens; ``result()`` turns their mean into maps. The object is
    shared, not copied, when ComfyUI clones model options.
    """

    def __init__(self, plan: LayerPlan, previous_override: Callable[..., Any] | None = None) -> None:
        self.plan = plan
        self.previous_override = previous_override
        self.active = False
        self.early_exit = False
        self.grad_attention = True
        self._positions: torch.Tensor | None = None
        self._columns: torch.Tensor | None = None
        self._temperature = 100.0
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._armed: tuple | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._hw: tuple[int, int] | None = None
        self._features: dict[int, torch.Tensor] = {}

    def __deepcopy__(self, memo):
        return self

    def configure(self, word_positions: Sequence[int], columns: Sequence[int], temperature: float = 100.0) -> None:
        """``word_positions``: sequence positions of the prompt's word tokens; ``columns``: for
        each subject, the index into word_positions of its noun token."""
        if not word_positions:
            raise RCDError("the prompt has no word tokens to attend to")
        if any(not 0 <= c < len(word_positions) for c in columns):
            raise RCDError(f"subject token columns {list(columns)} outside the prompt's {len(word_positions)} words")
        self._positions = torch.as_tensor(list(word_positions), dtype=torch.long)
        self._columns = torch.as_tensor(list(columns), dtype=torch.long)
        self._temperature = float(temperature)
        self._rows = None

    def configure_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], temperature: float = 100.0) -> None:
        """Per conditional row its own (word_positions, columns): a batch of different prompts
        (teachers of several subjects sampled together). Every row must have as many columns."""
        if not rows or len({len(c) for _, c in rows}) != 1:
            raise RCDError("configure_rows needs at least one row and the same number of columns in every row")
        self.configure(list(rows[0][0]), list(rows[0][1]), temperature)
        for positions, columns in rows:
            if not positions or any(not 0 <= c < len(positions) for c in columns):
                raise RCDError(f"row columns {list(columns)} outside its {len(positions)} words")
        self._rows = [(torch.as_tensor(list(p), dtype=torch.long), torch.as_tensor(list(c), dtype=torch.long))
                      for p, c in rows]

    def start(self, early_exit: bool = False) -> None:
        self._sum, self._count, self._hw, self._features, self._armed = None, 0, None, {}, None
        self.early_exit = early_exit
        self.active = True

    def stop(self) -> None:
        self.active = False
        self._armed = None

    def result(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """(maps (B, N, h, w) float32 or None when no map layer ran, features per input block id)."""
        self.stop()
        features = self._features
        if self._count == 0:
            return None, features
        mean = self._sum / self._count
        if self._rows is not None:  # per-row prompts: full token axis kept, words picked per row
            if mean.shape[0] != len(self._rows):
                raise RCDError(f"RCD: {mean.shape[0]} conditional rows but {len(self._rows)} row prompts configured")
            maps = torch.stack([
                (self._temperature * m.index_select(-1, _normal(p.to(m.device)))).softmax(dim=-1)
                .index_select(-1, _normal(c.to(m.device))).transpose(0, 1) for m, (p, c) in zip(mean, self._rows)])
        else:
            probs = (self._temperature * mean).softmax(dim=-1)  # over the word tokens
            cols = _normal(self._columns.to(probs.device))
            maps = probs[..., cols].transpose(1, 2)  # (B, N, hw)
        h, w = self._hw
        return maps.reshape(maps.shape[0], maps.shape[1], h, w), features

    # -- ComfyUI hooks -------------------------------------------------------------------
    def install(self, model_options: dict) -> None:
        """Register in a (cloned) model_options dict; an existing override is called in turn."""
        to = model_options.setdefault("transformer_options", {})
        patches = to.setdefault("patches", {})
        patches["attn1_patch"] = patches.get("attn1_patch", []) + [self.attn1_patch]
        patches["attn2_patch"] = patches.get("attn2_patch", []) + [self.attn2_patch]
        patches["input_block_patch"] = patches.get("input_block_patch", []) + [self.input_block_patch]
        if self.previous_override is None:
            self.previous_override = to.get("optimized_attention_override")
        to["optimized_attention_override"] = self.attention_override

    def attn1_patch(self, n, context, value, extra_options):
        self._armed = None
        return n, context, value

    def attn2_patch(self, n, context, value, extra_options):
        self._armed = None
        if not self.active:
            return n, context, value
        block = extra_options.get("block")
        shape = extra_options.get("activations_shape")
        if block is None or shape is None:
            return n, context, value
        key = (block[0], block[1], extra_options.get("block_index", 0))
        if key in self.plan.map_layers:
            self._armed = (key, int(shape[-2]), int(shape[-1]), tuple(extra_options.get("cond_or_uncond") or (0,)))
        return n, context, value

    def input_block_patch(self, h, transformer_options):
        if self.active:
            block = transformer_options.get("block")
            if block is not None and block[0] == "input" and block[1] in self.plan.feature_blocks:
                rows = _cond_rows(h.shape[0], transformer_options.get("cond_or_uncond"))
                if rows is not None:
                    self._features[block[1]] = h[rows]
        return h

    def attention_override(self, func, *args, **kwargs):
        if self.grad_attention and torch.is_grad_enabled():
            func = sdpa_attention
        armed, self._armed = self._armed, None
        if armed is not None:
            self._record(armed, args)
        if self.previous_override is not None:
            out = self.previous_override(func, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if armed is not None and self.early_exit and armed[0] == self.plan.last_map_layer:
            raise CaptureDone
        return out

    def _record(self, armed: tuple, args: tuple) -> None:
        key, h, w, cond_or_uncond = armed
        q, k, heads = args[0], args[1], args[3]
        rows = _cond_rows(q.shape[0], cond_or_uncond)
        if rows is None:
            return
        q, k = _normal(q[rows]), _normal(k[rows])
        if k.ndim == 4:  # skip_reshape callers: (B, heads, L, d)
            qh, kh = q.float(), k.float()
        else:
            n, hw, inner = q.shape
            d = inner // heads
            qh = q.float().reshape(n, hw, heads, d).transpose(1, 2)
            kh = k.float().reshape(n, -1, heads, d).transpose(1, 2)
        if qh.shape[2] != h * w:
            return  # another patch changed this layer's queries; leave it out
        if self._rows is not None:
            positions = _normal(torch.cat([p for p, _ in self._rows]).to(kh.device))
        else:
            positions = _normal(self._positions.to(kh.device))
        if int(positions.max()) >= kh.shape[2]:
            raise RCDError(f"RCD: layer {key} attends to {kh.shape[2]} tokens but the prompt's words reach position "
                           f"{int(positions.max())}; is the sampler's positive the RCD Embedding Refiner's output?")
        scale = qh.shape[-1] ** -0.5
        probs = (qh @ kh.transpose(-1, -2) * scale).softmax(dim=-1).mean(dim=1)  # (n, hw, L)
        words = probs if self._rows is not None else probs.index_select(-1, positions)
        if self._hw is not None and self._hw != (h, w):
            raise RCDError(f"RCD: map layers disagree on resolution ({self._hw} vs {(h, w)})")
        self._hw = (h, w)
        self._sum = words if self._sum is None else self._sum + words
        self._count += 1


# --------------------------------------------------------------------------- optimiser

Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, Mapping[int, torch.Tensor]]]


class LatentOptimizer:
    """RCD's latent steps for one sampling run.

    ``step(i, x, sigma, forward)`` optimises the sampler's latent ``x`` in place (it may be an
    inference-mode tensor: the gradient work runs with inference mode off, on an ordinary
    copy) and returns whether it did. ``forward(x, sigma)`` runs the UNet on the conditional
    rows with an AttentionCapture recording and returns (maps (B, N, h, w), features).
    ``records`` holds one dict per optimised step (loss terms, iterations).
    """

    def __init__(self, options: RCDOptions, teacher: TeacherFeatures | None = None) -> None:
        self.options = options
        self.teacher = teacher if options.distill else None
        self.history: dict[int, torch.Tensor] = {}
        self.records: list[dict[str, Any]] = []
        self._refine = dict(options.refine)

    def active(self, step: int) -> bool:
        o = self.options
        if step >= o.t_f or (o.k == 0 and step not in self._refine):
            return False
        return o.delta_at(step) > 0 or (self.teacher is not None and self.teacher.has(step))

    def step(self, i: int, x: torch.Tensor, sigma: torch.Tensor, forward: Forward) -> bool:
        if not self.active(i):
            return False
        o = self.options
        with torch.inference_mode(False), torch.enable_grad():
            x_opt = x.detach().clone()
            sig = sigma.detach().clone().reshape(-1)
            if sig.numel() == 1:
                sig = sig.expand(x_opt.shape[0])
            scale = (o.step_size * (1.0 + sig.double() ** 2)).to(x_opt.dtype).view(-1, *([1] * (x_opt.ndim - 1)))
            record: dict[str, Any] = {"step": i, "sigma": float(sig.max()), "iters": 0, "delta": o.delta_at(i)}
            for it in range(o.k):
                got = self._evaluate(i, x_opt, sig, forward, True)
                if got is None:
                    record["skipped"] = "no attention maps captured"
                    break
                loss, maps, terms = got
                if it == 0:
                    record.update(loss=float(loss.detach()), **terms)
                    self._remember(i, maps)
                x_opt = self._descend(x_opt, loss, scale)
                record["iters"] += 1
            threshold = self._refine.get(i)
            if threshold is not None and "skipped" not in record:
                record["refine_threshold"] = threshold
                for _ in range(o.max_refine_iters):
                    got = self._evaluate(i, x_opt, sig, forward, True)
                    if got is None:
                        break
                    loss, maps, terms = got
                    if "loss" not in record:
                        record.update(loss=float(loss.detach()), **terms)
                        self._remember(i, maps)
                    if self._reached(maps, threshold):
                        break
                    x_opt = self._descend(x_opt, loss, scale)
                    record["iters"] += 1
            if o.track_loss and "skipped" not in record:
                with torch.no_grad():
                    got = self._evaluate(i, x_opt, sig, forward, False)
                if got is not None:
                    record["loss_after"] = float(got[0])
                    record.update({f"{k}_after": v for k, v in got[2].items()})
        self.records.append(record)
        if record["iters"] == 0:
            return False
        with torch.no_grad():
            x.copy_(x_opt.to(x.dtype))
        return True

    # -- internals ------------------------------------------------------------------------
    def _evaluate(self, i: int, x_opt: torch.Tensor, sig: torch.Tensor, forward: Forward, grad: bool):
        x_in = x_opt.requires_grad_(True) if grad else x_opt
        maps, features = forward(x_in, sig)
        if maps is None:
            return None
        maps = maps.float()
        o = self.options
        delta = o.delta_at(i)
        prev = self.history.get(i - o.loss.t_c) if delta > 0 else None
        teacher = self.teacher.at(i) if self.teacher is not None and self.teacher.has(i) else None
        total = maps.new_zeros(())
        terms = {"rae": 0.0, "rcr": 0.0, "rc": 0.0, "fd": 0.0}
        masks = subject_masks(maps, o.loss) if teacher is not None else None
        for b in range(maps.shape[0]):
            if delta > 0:
                t = attention_control_terms(maps[b], prev[b] if prev is not None and prev.shape == maps.shape else None,
                                            o.loss)
                total = total + delta * t["total"]
                for name in ("rae", "rcr", "rc"):
                    terms[name] += float(t[name].detach())
            if teacher is not None:
                student, target = [], []
                for block, tvec in teacher.items():
                    f = features.get(block)
                    if f is None or tvec.shape[0] != maps.shape[0]:
                        continue
                    student.append(mask_average_pool(f[b].float(), masks[b]))
                    target.append(tvec[b].to(f.device))
                if student:
                    fd = feature_distillation_loss(student, target)
                    total = total + fd
                    terms["fd"] += float(fd.detach())
        return total, maps.detach(), terms

    def _descend(self, x_opt: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not loss.requires_grad:
            return x_opt.detach()
        (grad,) = torch.autograd.grad(loss, x_opt)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        return (x_opt - scale * grad).detach()

    def _remember(self, i: int, maps: torch.Tensor) -> None:
        self.history[i] = maps
        for old in [s for s in self.history if s < i - self.options.loss.t_c]:
            del self.history[old]

    def _reached(self, maps: torch.Tensor, threshold: float) -> bool:
        cfg = self.options.loss
        flat = maps.flatten(0, 1)
        if cfg.smooth:
            flat = gaussian_smooth(flat, cfg.sigma, cfg.kernel)
        return bool((flat.amax(dim=(-2, -1)) >= threshold).all())
