#!/usr/bin/env python3
"""A micro SD1.5-layout diffusion model trained here, on CPU, on a synthetic "concept world".

Why: a random-weight UNet cannot show that a region prompt lands where it is painted. This
script trains ComfyUI's own UNetModel (the `micro` preset of random_checkpoints.py: 64 channels,
levels (1, 2), a transformer at every level, context 64, 2 heads) against the frozen random
CLIP of the tiny checkpoint, so that each prompt word produces a known, per-latent-pixel
classifiable pattern. A benchmark can then paint "fox" into a box, sample, and count the latent
pixels that came out fox. (The 32-channel tiny UNet cannot learn this: see MICRO in
random_checkpoints.py; its GroupNorms erase the overall colour of a latent.)

The concept world (importable, free of ComfyUI imports; `scripts/` is on sys.path in tests):
  * CONCEPTS: 8 objects (fox car tree boat house bird flower lamp) and 3 backgrounds (meadow
    sea desert). Each is a colour: a vertex of the 4-d cube, +-0.8 per latent channel in the
    model's (scaled) space, so prototypes are >= 1.6 apart and nearest-prototype classification
    of a clean pixel is exact; plus a mild texture, stripes that modulate the colour's
    brightness by +-25 % with a concept-specific angle and period (the sign of every channel,
    hence the class, never changes). The colours are chosen so ComfyUI's SD1.5 latent2rgb
    preview shows meadow green, sea blue, desert sand, fox red-brown, car blue.
  * Layout(background, objects=((name, mask), ...)) -> labels(), prompt(); render(layout);
    classify(latent); accuracy(latent, layout); prototypes(); random_layout(generator, ...).
  * Spaces: `space="latent"` (default) is what ComfyUI's LATENT dicts hold (KSampler output,
    VAE encode); `space="model"` is that times LATENT_SCALE (0.18215), the space the UNet
    denoises and the one the prototypes are designed in.
  * Prompts: "a fox" (the concept over the whole canvas), "a fox on a meadow", "a fox and a
    car on a meadow"; "" is the unconditional prompt (cfg dropout).

Training: eps-prediction on the SD1.5 discrete schedule (scaled_linear 0.00085..0.012, 1000
steps), so ComfyUI samples it with its normal SD15 model_sampling (euler, lcm, ...); the loss
weights each sample by 1/alphas_cumprod (see train()). Data mix: single concepts over the full
canvas, object-on-background scenes (boxes and blobs at random places and sizes), two-object
scenes; 10 % of prompts replaced by "" so cfg > 1 works. Latents of 8x8, 16x16 and 32x32
(256 px canvas, what the benchmarks use) are mixed per step; the model works at 16 and 32.
AdamW, warmup + cosine LR, EMA weights are saved. Deterministic: fixed seeds, CPU, 2 threads
(torch results can differ with another thread count or CPU).

What the model can stand for: whether a prompt's concept lands where it is painted (region
fidelity, leakage between regions, background fill), per latent pixel, through ComfyUI's real
sampling code, conditioning path and cross-attention layers, with cfg and with LCM-style
sampling. What it cannot stand for: image quality (the VAE is a random TAESD: decoded images
are noise; judge latents with classify()), text understanding beyond one word per concept
(the CLIP is random and frozen: "a red fox" or "vulpes" mean nothing learnt), or the attention
statistics of a real SD1.5 (a 4M-parameter UNet with 2 heads and one 1-layer text encoder has
none of its head specialisation, token weighting or depth). Timings with it say nothing
about a real model's speed.

Measured (defaults, seed 0, 2 idle cores, torch 2.13 CPU): 339 s of training (1100 steps,
18256 samples), final eps-MSE 0.077. Verify at 32x32, sampled with ComfyUI's own code: single
concepts, mean (min) per-pixel accuracy: euler 20 cfg 1 0.990 (0.94), euler 20 cfg 5 0.999
(0.99; colours overshoot to 1.8x the prototype norm, classes unchanged), lcm 6 cfg 1 1.000
(1.00). Object-on-background prompts without regions: 93-97 % of pixels show a prompted concept,
but objects come out small (3-13 % of the canvas; lcm 6 often drops the object). Why the
design: the 32-channel tiny UNet's GroupNorm(32, 32) is an instance norm that erases the channel
means carrying each concept's colour (chance accuracy after 600 steps). At 64 channels, single
concepts only, 8x8 latents, 600 steps, euler at 16x16: plain eps-MSE 0.36, the 1/alphas_cumprod
weight 0.76, that weight plus offset noise 1.00 (see train()).

CLI (host venv python; needs ComfyUI, default <pack>/.host/ComfyUI):
  python scripts/train_micro_model.py [OUT.safetensors] [--force] [--verify] [--no-verify]
Default OUT: <pack>/.host/ComfyUI/models/checkpoints/micro_concepts.safetensors (ignored by
git), reused when present and trained by this version of the script with the same settings
(`--force` retrains). A sidecar OUT.json holds training seconds, steps, final loss and the
verify accuracies. Training (about 6 min on 2 idle cores, more when they are shared) ends with
the verify (about 2.5 min) unless --no-verify;
`--verify` on an existing checkpoint samples with ComfyUI's KSampler code and reports per-pixel
accuracies. Loading the checkpoint in ComfyUI needs random_checkpoints.register_tiny_sd15(),
as the tiny checkpoint does. Prints one JSON object at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

if __name__ == "__main__":
    # Must precede torch's OpenMP start. libgomp's default spin-wait (300k spins) made a training
    # step 10-50x slower on 2 cores shared with other busy processes (a spinning worker waits for
    # a descheduled partner); passive waiting avoids that but is ~1.7x slower on idle cores.
    # 30k spins measured within 5 % of the default when idle and within 25 % of passive when the
    # cores are shared. Only for the CLI: importers keep their settings.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PACK_DIR / ".host" / "ComfyUI" / "models" / "checkpoints" / "micro_concepts.safetensors"
LATENT_SCALE = 0.18215  # SD1.5 LatentFormat.scale_factor: model space = LATENT samples * this

# --------------------------------------------------------------------------------------------
# The concept world (no ComfyUI imports)
# --------------------------------------------------------------------------------------------

PROTOTYPE_SCALE = 0.8   # per channel; SD1.5 latents are ~unit scale in model space
TEXTURE_AMPLITUDE = 0.25  # relative brightness modulation; < 1, so channel signs never flip


@dataclass(frozen=True)
class Concept:
    """One prompt word and its pattern: colour `signs` x PROTOTYPE_SCALE, brightness stripes."""
    name: str
    kind: str                                 # "object" or "background"
    signs: tuple[int, int, int, int]          # cube vertex of the colour
    stripe_angle_deg: float                   # 0: stripes vary along x (vertical stripes)
    stripe_period: float                      # in latent pixels

    @property
    def prototype(self) -> torch.Tensor:
        """Colour in model space, shape (4,)."""
        return torch.tensor(self.signs, dtype=torch.float32) * PROTOTYPE_SCALE


CONCEPTS: tuple[Concept, ...] = (
    Concept("fox", "object", (1, -1, -1, 1), 0, 4),
    Concept("car", "object", (-1, -1, 1, -1), 90, 4),
    Concept("tree", "object", (-1, -1, 1, 1), 45, 4),
    Concept("boat", "object", (1, 1, 1, -1), 135, 4),
    Concept("house", "object", (1, -1, 1, 1), 0, 6),
    Concept("bird", "object", (-1, 1, -1, -1), 90, 6),
    Concept("flower", "object", (1, -1, -1, -1), 45, 6),
    Concept("lamp", "object", (1, 1, -1, -1), 135, 6),
    Concept("meadow", "background", (-1, 1, 1, 1), 30, 8),
    Concept("sea", "background", (1, -1, 1, -1), 90, 8),
    Concept("desert", "background", (1, 1, -1, 1), 150, 8),
)
CONCEPT_IDS: dict[str, int] = {c.name: i for i, c in enumerate(CONCEPTS)}
OBJECTS: tuple[str, ...] = tuple(c.name for c in CONCEPTS if c.kind == "object")
BACKGROUNDS: tuple[str, ...] = tuple(c.name for c in CONCEPTS if c.kind == "background")
UNKNOWN = -1  # classify() label of a rejected pixel


def concept_id(name: str) -> int:
    """Index of a concept in CONCEPTS (the label classify() returns)."""
    try:
        return CONCEPT_IDS[name]
    except KeyError:
        raise ValueError(f"unknown concept {name!r}; known: {', '.join(CONCEPT_IDS)}") from None


def _to_space(t: torch.Tensor, space: str) -> torch.Tensor:
    if space == "model":
        return t
    if space == "latent":
        return t / LATENT_SCALE
    raise ValueError(f"space must be 'latent' or 'model', not {space!r}")


def prototypes(space: str = "latent") -> torch.Tensor:
    """(len(CONCEPTS), 4) colours, rows in CONCEPTS order."""
    return _to_space(torch.stack([c.prototype for c in CONCEPTS]), space)


@dataclass(frozen=True, eq=False)
class Layout:
    """A scene: `background` everywhere, then each (concept, (H, W) mask) painted on top in order.

    A single concept over the whole canvas is Layout("fox") (any concept may be the background).
    Masks are bool (or float, read as > 0.5) at latent resolution.
    """
    background: str
    objects: tuple[tuple[str, torch.Tensor], ...] = ()
    height: int = 32
    width: int = 32

    def __post_init__(self) -> None:
        concept_id(self.background)
        for name, mask in self.objects:
            concept_id(name)
            if tuple(mask.shape) != (self.height, self.width):
                raise ValueError(f"mask of {name!r} is {tuple(mask.shape)}, layout is {(self.height, self.width)}")

    def masks(self) -> list[tuple[int, torch.Tensor]]:
        """(concept id, bool mask) for the background and every object, in paint order."""
        out = [(concept_id(self.background), torch.ones(self.height, self.width, dtype=torch.bool))]
        for name, mask in self.objects:
            out.append((concept_id(name), mask > 0.5 if mask.is_floating_point() else mask.bool()))
        return out

    def labels(self) -> torch.Tensor:
        """(H, W) int64 concept ids: what classify() should return for a faithful sample."""
        lab = torch.empty(self.height, self.width, dtype=torch.long)
        for cid, mask in self.masks():
            lab[mask] = cid
        return lab

    def prompt(self) -> str:
        """The training prompt of this layout ("a fox", "a fox on a meadow", "a fox and a car on a meadow")."""
        if not self.objects:
            return f"a {self.background}"
        names = " and ".join(f"a {name}" for name, _ in self.objects)
        return f"{names} on a {self.background}"


def render(layout: Layout, *, generator: torch.Generator | None = None, space: str = "latent") -> torch.Tensor:
    """Clean latent (1, 4, H, W) of a layout. Stripe phases are 0, or random per concept
    instance when a generator is given (training draws them, so position says nothing)."""
    h, w = layout.height, layout.width
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = torch.empty(4, h, w)
    for cid, mask in layout.masks():
        c = CONCEPTS[cid]
        phase = 0.0 if generator is None else float(torch.rand((), generator=generator)) * 2 * math.pi
        a = math.radians(c.stripe_angle_deg)
        u = xx * math.cos(a) + yy * math.sin(a)
        bright = 1 + TEXTURE_AMPLITUDE * torch.sin(2 * math.pi * u / c.stripe_period + phase)
        pattern = c.prototype[:, None, None] * bright
        out = torch.where(mask, pattern, out)
    return _to_space(out.unsqueeze(0), space)


def classify(latent: torch.Tensor, *, space: str = "latent", smooth: bool = False,
             reject: float | None = None) -> torch.Tensor:
    """Nearest-prototype concept id per pixel: (4, H, W) -> (H, W), (B, 4, H, W) -> (B, H, W).

    smooth: average each pixel with its 3x3 neighbours first (removes the stripes; blurs
    one-pixel structures). reject: model-space distance beyond which a pixel is UNKNOWN (-1);
    PROTOTYPE_SCALE (half the smallest prototype distance) accepts only pixels nearer their own
    prototype than the midpoint to any other. None keeps every pixel's nearest concept.
    """
    x = latent.float()
    single = x.dim() == 3
    if single:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 4:
        raise ValueError(f"expected a (4, H, W) or (B, 4, H, W) latent, got {tuple(latent.shape)}")
    if space == "latent":
        x = x * LATENT_SCALE
    elif space != "model":
        raise ValueError(f"space must be 'latent' or 'model', not {space!r}")
    if smooth:
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    d = torch.cdist(x.permute(0, 2, 3, 1).reshape(-1, 4), prototypes("model"))
    dist, ids = d.min(dim=1)
    if reject is not None:
        ids = torch.where(dist > reject, torch.full_like(ids, UNKNOWN), ids)
    ids = ids.reshape(x.shape[0], x.shape[2], x.shape[3])
    return ids[0] if single else ids


def accuracy(latent: torch.Tensor, layout: Layout, **classify_kw) -> float:
    """Fraction of latent pixels whose class is the layout's label there."""
    return (classify(latent, **classify_kw) == layout.labels()).float().mean().item()


def downsample_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(H*factor, W*factor) pixel mask (bool or 0..1) -> (H, W) bool latent mask: a latent pixel
    belongs to the region when at least half of its factor x factor pixels do. For building a
    Layout (the expected labels) from the masks painted on a canvas."""
    m = mask.float()
    if m.dim() != 2 or m.shape[0] % factor or m.shape[1] % factor:
        raise ValueError(f"expected an (H, W) mask with sides divisible by {factor}, got {tuple(mask.shape)}")
    return torch.nn.functional.avg_pool2d(m[None, None], factor)[0, 0] >= 0.5


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    """(H, W) bool mask of rows top..bottom-1, columns left..right-1."""
    m = torch.zeros(height, width, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


def blob_mask(height: int, width: int, cy: float, cx: float, ry: float, rx: float,
              angle: float = 0.0, wobble: float = 0.0, lobes: int = 3, wobble_phase: float = 0.0) -> torch.Tensor:
    """(H, W) bool mask of a rotated ellipse (centre and radii in pixels) whose radius wobbles
    by +-`wobble` (relative) with `lobes` bumps around it."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                            torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    r = torch.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    theta = torch.atan2(v / ry, u / rx)
    return r <= 1 + wobble * torch.sin(lobes * theta + wobble_phase)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def random_object_mask(gen: torch.Generator, height: int, width: int) -> torch.Tensor:
    """A box or a blob, 20-60 % of the canvas side, anywhere on the canvas."""
    for _ in range(20):
        if float(torch.rand((), generator=gen)) < 0.5:
            bh = _randint(gen, max(2, round(0.2 * height)), round(0.6 * height))
            bw = _randint(gen, max(2, round(0.2 * width)), round(0.6 * width))
            top, left = _randint(gen, 0, height - bh), _randint(gen, 0, width - bw)
            m = box_mask(height, width, top, left, top + bh, left + bw)
        else:
            ry, rx = _uniform(gen, 0.1, 0.3) * height, _uniform(gen, 0.1, 0.3) * width
            m = blob_mask(height, width, _uniform(gen, 0.15, 0.85) * height, _uniform(gen, 0.15, 0.85) * width,
                          ry, rx, angle=_uniform(gen, 0, math.pi), wobble=_uniform(gen, 0, 0.25),
                          lobes=_randint(gen, 2, 4), wobble_phase=_uniform(gen, 0, 2 * math.pi))
        if 4 <= int(m.sum()) <= 0.5 * height * width:
            return m
    return box_mask(height, width, height // 4, width // 4, height // 2, width // 2)


def random_layout(gen: torch.Generator, height: int = 32, width: int = 32, kind: str = "scene") -> Layout:
    """A random layout of the training distribution. kind: "single" (any concept, whole canvas),
    "scene" (an object on a background), "pair" (two different objects on a background)."""
    def pick(names: Sequence[str]) -> str:
        return names[_randint(gen, 0, len(names) - 1)]

    if kind == "single":
        return Layout(pick([c.name for c in CONCEPTS]), height=height, width=width)
    bg = pick(BACKGROUNDS)
    if kind == "scene":
        return Layout(bg, ((pick(OBJECTS), random_object_mask(gen, height, width)),), height, width)
    if kind == "pair":
        first = pick(OBJECTS)
        second = pick([o for o in OBJECTS if o != first])
        m1 = random_object_mask(gen, height, width)
        for _ in range(20):  # the second must leave a visible part of the first
            m2 = random_object_mask(gen, height, width)
            if int((m1 & ~m2).sum()) >= 4:
                break
        return Layout(bg, ((first, m1), (second, m2)), height, width)
    raise ValueError(f"kind must be single, scene or pair, not {kind!r}")


def all_prompts() -> list[str]:
    """Every prompt of the training distribution, "" (unconditional) first."""
    singles = [f"a {c.name}" for c in CONCEPTS]
    scenes = [f"a {o} on a {b}" for b in BACKGROUNDS for o in OBJECTS]
    pairs = [f"a {o1} and a {o2} on a {b}" for b in BACKGROUNDS for o1 in OBJECTS for o2 in OBJECTS if o1 != o2]
    return [""] + singles + scenes + pairs


# --------------------------------------------------------------------------------------------
# Training, checkpoint, verify (ComfyUI)
# --------------------------------------------------------------------------------------------

SCRIPT_VERSION = 4  # bump when training changes in a way the fingerprint does not see


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (hashed into the checkpoint fingerprint)."""
    seed: int = 0
    steps: int = 1100
    preset: str = "micro"         # random_checkpoints preset of the UNet
    # (latent side, batch, probability) per step. Small latents teach the colour fastest: a
    # channel's mean is 1/side of its noise, so a wrong overall colour costs the most at 8x8;
    # a few 32x32 steps adapt the model to the 256 px canvas the benchmarks use.
    res_mix: tuple[tuple[int, int, float], ...] = ((8, 24, 0.45), (16, 12, 0.45), (32, 4, 0.1))
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    p_uncond: float = 0.1         # cfg dropout
    offset_noise: float = 0.2     # std of a per-sample, per-channel constant added to the noise
    mix: tuple[tuple[str, float], ...] = (("single", 0.35), ("scene", 0.45), ("pair", 0.2))
    threads: int = 2

    def fingerprint(self) -> str:
        world = [(c.name, c.kind, c.signs, c.stripe_angle_deg, c.stripe_period) for c in CONCEPTS]
        preset = asdict(_rc().PRESETS[self.preset])
        blob = json.dumps([SCRIPT_VERSION, asdict(self), preset, world, PROTOTYPE_SCALE, TEXTURE_AMPLITUDE],
                          default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD1.5 discrete schedule (ComfyUI ModelSamplingDiscrete, scaled_linear 0.00085..0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _rc():
    """scripts/random_checkpoints.py, imported by name (this file sits next to it)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import random_checkpoints
    return random_checkpoints


def _sdpa_override(func: Callable, *args, **kwargs) -> torch.Tensor:
    """ComfyUI's attention override hook: train with torch SDPA (CPU ComfyUI picks sub-quadratic
    attention, ~1.7x slower here); the math is the same, sampling keeps ComfyUI's own choice."""
    from comfy.ldm.modules.attention import attention_pytorch
    return attention_pytorch(*args, **kwargs)


def build_unet(seed: int, preset: str = "micro") -> torch.nn.Module:
    """ComfyUI's UNetModel of a random_checkpoints preset, trainable init (PyTorch defaults, zero
    output conv)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    rc = _rc()
    torch.manual_seed(seed)
    unet = UNetModel(**rc.unet_config(rc.PRESETS[preset]), operations=comfy.ops.disable_weight_init,
                     device="cpu", dtype=torch.float32)
    # ComfyUI's ops skip init (weights come from checkpoints); restore the stock torch init
    for m in unet.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
    # zero output conv: the first prediction is eps = 0, the usual diffusion init, stabler start
    last = unet.out[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return unet


def load_comfy(sd: dict[str, torch.Tensor] | str | os.PathLike):
    """(model patcher, clip) from a state dict or a checkpoint path, through ComfyUI's loader."""
    import comfy.sd
    _rc().register_tiny_sd15()
    if isinstance(sd, dict):  # a copy: the loader pops the keys it consumes
        out = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=False, output_clip=True)
    else:
        out = comfy.sd.load_checkpoint_guess_config(str(sd), output_vae=False, output_clip=True)
    return out[0], out[1]


def encode(clip, prompts: Sequence[str]) -> list:
    """One CONDITIONING for a batch of prompts (row i = prompt i), as CLIPTextEncode makes them."""
    conds, pooled = [], []
    for p in prompts:
        c = clip.encode_from_tokens_scheduled(clip.tokenize(p), show_pbar=False)[0]
        conds.append(c[0])
        pooled.append(c[1].get("pooled_output"))
    extra = {"pooled_output": torch.cat(pooled)} if all(p is not None for p in pooled) else {}
    return [[torch.cat(conds), extra]]


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the UNet; returns (checkpoint state dict: EMA UNet + CLIP + TAESD, stats)."""
    rc = _rc()
    # CLIP and TAESD exactly as in the tiny checkpoint of the same seed (fp16, what tests write),
    # so both encode a prompt alike; only the UNet is replaced (and kept fp32)
    tiny = rc.build_state_dict(rc.TINY, seed=cfg.seed, dtype=torch.float16)
    _, clip = load_comfy(tiny)
    base = {k: v for k, v in tiny.items() if not k.startswith("model.diffusion_model.")}
    prompts = all_prompts()
    t0 = time.time()
    with torch.no_grad():
        table = encode(clip, prompts)[0][0].float()          # (P, 77, 64), the frozen CLIP's output
    prompt_index = {p: i for i, p in enumerate(prompts)}
    log(f"encoded {len(prompts)} prompts in {time.time() - t0:.1f}s")

    unet = build_unet(cfg.seed, cfg.preset)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        prog = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * prog)))

    ac = sd15_alphas_cumprod()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    kinds = [k for k, _ in cfg.mix]
    kind_p = torch.tensor([p for _, p in cfg.mix])
    res_p = torch.tensor([p for _, _, p in cfg.res_mix])
    losses: list[float] = []
    seconds_by_res: dict[int, float] = {}
    samples = 0
    t_start = time.time()
    unet.train()
    for step in range(cfg.steps):
        t_step = time.time()
        res, bs, _ = cfg.res_mix[int(torch.multinomial(res_p, 1, generator=gen))]
        x0, idx = [], []
        for _ in range(bs):
            layout = random_layout(gen, res, res, kinds[int(torch.multinomial(kind_p, 1, generator=gen))])
            x0.append(render(layout, generator=gen, space="model"))
            drop = float(torch.rand((), generator=gen)) < cfg.p_uncond
            idx.append(0 if drop else prompt_index[layout.prompt()])
        x0 = torch.cat(x0)
        t = torch.randint(0, 1000, (bs,), generator=gen)
        # Offset noise (as for SD1.5 fine-tunes that need dark or bright images): a concept's
        # colour is the latent's per-channel mean, which iid noise hardly perturbs (std 1/side),
        # so a model trained on it learns to keep whatever mean the starting noise had and
        # samples the wrong colour. A constant per channel in eps makes the mean something the
        # model must predict; it samples with ComfyUI's plain noise as usual.
        eps = torch.randn(x0.shape, generator=gen) + cfg.offset_noise * torch.randn(bs, 4, 1, 1, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        pred = unet(xt, t.float(), table[idx], transformer_options={"optimized_attention_override": _sdpa_override})
        per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        # Weight 1/alphas_cumprod (= SNR + 1 per unit x0 error, the v-prediction loss) instead of
        # plain eps-MSE: at high noise an x0 error shows in eps only scaled by sqrt(SNR) (0.07 at
        # t=999), so plain eps-MSE barely teaches the prompt there, and a model that reads the
        # concept off the noise's mean (SD1.5's schedule never reaches zero SNR) then samples a
        # random concept from pure noise. The prediction target stays eps.
        w = 1.0 / a.view(-1)
        loss = (w * per_sample).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))  # short warmup: early EMA follows the weights
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        losses.append(per_sample.mean().item())  # plain eps-MSE, comparable across weightings
        samples += bs
        seconds_by_res[res] = seconds_by_res.get(res, 0.0) + time.time() - t_step
        if step % 100 == 0 or step == cfg.steps - 1:
            recent = losses[-100:]
            log(f"step {step:5d}/{cfg.steps} res {res} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(step):.2e} {time.time() - t_start:.0f}s")
    seconds = time.time() - t_start
    tail = losses[-max(1, cfg.steps // 10):]
    stats = {"training_seconds": round(seconds, 1), "steps": cfg.steps,
             "final_loss": round(sum(tail) / len(tail), 5),  # plain eps-MSE, mean of the last 10 % of steps
             "samples_seen": samples,
             "seconds_by_latent_side": {str(r): round(v, 1) for r, v in sorted(seconds_by_res.items())}}
    unet_sd = {"model.diffusion_model." + k: v.contiguous() for k, v in ema.items()}
    return {**base, **unet_sd}, stats


def _sample(model, conds: list, negative: list, steps: int, cfg: float, sampler: str, scheduler: str,
            size: int, seed: int) -> torch.Tensor:
    """ComfyUI's KSampler path (comfy.sample.sample, as nodes.common_ksampler calls it) on an
    empty latent; returns LATENT samples."""
    import comfy.sample
    n = conds[0][0].shape[0]
    latent = torch.zeros(n, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, conds, negative, latent,
                               disable_pbar=True, seed=seed)


VERIFY_CONFIGS: tuple[tuple[str, str, str, int, float], ...] = (
    # (label, sampler, scheduler, steps, cfg)
    ("euler20_cfg1", "euler", "normal", 20, 1.0),
    ("euler20_cfg5", "euler", "normal", 20, 5.0),
    ("lcm6_cfg1", "lcm", "sgm_uniform", 6, 1.0),
)


def verify(path: str | os.PathLike, size: int = 32, seeds: int = 2, log: Callable[[str], None] = print) -> dict:
    """Sample every single concept (`seeds` times) and 12 object-on-background scenes with
    ComfyUI's own sampling code (no regional prompting); per-pixel accuracies per sampler/cfg.

    single: fraction of pixels classified as the prompted concept (mean, min over samples; also
    after 3x3 smoothing) and the mean colour norm relative to the prototypes' (cfg > 1 inflates
    it). scene: fraction of pixels showing either prompted concept, the object's mean area, and
    the fraction of samples showing both (object >= 4 px, background >= 20 %)."""
    import comfy.model_management
    t0 = time.time()
    model, clip = load_comfy(path)
    # the checkpoint must carry the schedule it was trained on
    sig = model.get_model_object("model_sampling").sigmas.float().cpu()
    ac = sd15_alphas_cumprod()
    if not torch.allclose(sig, ((1 - ac) / ac).sqrt(), rtol=1e-4):
        raise RuntimeError(f"{path}: ComfyUI did not load it with SD1.5's discrete schedule")
    negative = encode(clip, [""])
    singles = [c.name for c in CONCEPTS] * seeds
    single_conds = encode(clip, [f"a {n}" for n in singles])
    single_ids = torch.tensor([concept_id(n) for n in singles])
    # half the object x background pairs, every object and background among them (saves time)
    scenes = [(o, b) for j, b in enumerate(BACKGROUNDS) for i, o in enumerate(OBJECTS) if (i + j) % 2 == 0]
    scene_conds = encode(clip, [f"a {o} on a {b}" for o, b in scenes])
    report: dict = {"size": size, "seeds": seeds, "single": {}, "scene": {}}
    for label, sampler, scheduler, steps, cfg in VERIFY_CONFIGS:
        lat = _sample(model, single_conds, negative, steps, cfg, sampler, scheduler, size, seed=1)
        ids = classify(lat)
        per = (ids == single_ids[:, None, None]).float().mean(dim=(1, 2))
        per_concept = {c.name: round(per[single_ids == i].mean().item(), 4) for i, c in enumerate(CONCEPTS)}
        smooth = (classify(lat, smooth=True) == single_ids[:, None, None]).float().mean().item()
        norm = (lat * LATENT_SCALE).norm(dim=1).mean().item() / prototypes("model").norm(dim=1).mean().item()
        report["single"][label] = {"mean": round(per.mean().item(), 4), "min": round(per.min().item(), 4),
                                   "mean_3x3": round(smooth, 4), "norm_ratio": round(norm, 3),
                                   "per_concept": per_concept}
        lat = _sample(model, scene_conds, negative, steps, cfg, sampler, scheduler, size, seed=2)
        ids = classify(lat)
        obj = torch.tensor([concept_id(o) for o, _ in scenes])[:, None, None]
        bg = torch.tensor([concept_id(b) for _, b in scenes])[:, None, None]
        named = ((ids == obj) | (ids == bg)).float().mean(dim=(1, 2))   # pixels showing a prompted concept
        obj_frac = (ids == obj).float().mean(dim=(1, 2))
        both = ((obj_frac >= 4 / size ** 2) & ((ids == bg).float().mean(dim=(1, 2)) >= 0.2)).float()
        report["scene"][label] = {"prompted_pixels": round(named.mean().item(), 4),
                                  "min_prompted_pixels": round(named.min().item(), 4),
                                  "object_area": round(obj_frac.mean().item(), 4),
                                  "both_present": round(both.mean().item(), 4)}
        log(f"verify {label}: single mean {per.mean():.4f} min {per.min():.4f}; scene prompted "
            f"{named.mean():.4f}, object area {obj_frac.mean():.3f}, both present {both.mean():.2f}")
    report["verify_seconds"] = round(time.time() - t0, 1)
    comfy.model_management.unload_all_models()
    return report


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"checkpoint path (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    ap.add_argument("--verify", action="store_true", help="sample and report accuracies (also after training)")
    ap.add_argument("--no-verify", action="store_true", help="skip the verify after training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--verify-size", type=int, default=32, help="latent side for the verify (16 or 32)")
    ap.add_argument("--verify-seeds", type=int, default=2, help="samples per single concept in the verify")
    ap.add_argument("--comfyui", default=None, help="ComfyUI dir (default <pack>/.host/ComfyUI)")
    a = ap.parse_args(argv)
    cfg = TrainConfig(seed=a.seed, steps=a.steps)
    torch.set_num_threads(cfg.threads)
    _rc().use_comfyui(a.comfyui)
    out = Path(a.out)
    sidecar = out.with_suffix(".json")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  stdout keeps the JSON

    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    fresh = out.is_file() and meta.get("fingerprint") == cfg.fingerprint()
    trained = False
    if a.force or not fresh:
        if out.is_file() and not a.force:
            log(f"{out} was trained with other settings or script version: retraining")
        import safetensors.torch
        load0, cpu0, t0 = _load_average(), time.process_time(), time.time()
        sd, stats = train(cfg, log)
        stats["process_cpu_seconds"] = round(time.process_time() - cpu0, 1)
        stats["wall_seconds_with_setup"] = round(time.time() - t0, 1)
        stats["load_average_before"], stats["load_average_after"] = load0, _load_average()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        safetensors.torch.save_file(sd, str(tmp), metadata={"micro_concepts_fingerprint": cfg.fingerprint()})
        os.replace(tmp, out)  # never leave a half-written checkpoint that looks reusable
        meta = {"fingerprint": cfg.fingerprint(), "config": asdict(cfg), **stats, "concept_accuracy": None}
        sidecar.write_text(json.dumps(meta, indent=1))
        trained = True
        log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) after {stats['training_seconds']}s of training")
    else:
        log(f"reusing {out} (trained in {meta.get('training_seconds')}s; --force retrains)")
    if a.verify or (trained and not a.no_verify):
        meta["concept_accuracy"] = verify(out, size=a.verify_size, seeds=a.verify_seeds, log=log)
        sidecar.write_text(json.dumps(meta, indent=1))
    print(json.dumps({"checkpoint": str(out), "trained_now": trained, **meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
