#!/usr/bin/env python3
"""Random-weight SD1.5, Flux and SD3 checkpoints built with ComfyUI's own classes (no downloads).

Key names come from ComfyUI's UNetModel / SDClipModel / TAESD, so they are exactly what its
loader expects. Presets:
  * tiny:  32 channels, 1-layer 64-wide CLIP (~13 MB). Needs register_tiny_sd15() in the ComfyUI
           process (tests/support/tiny_sd_pack does that at server load time).
  * stock: 320 channels, shallow UNet, full CLIP-L shape (~290 MB). Stock SD15 detection accepts it.
  * micro: tiny at 64 channels (~4 MB UNet); scripts/train_micro_model.py trains it. Needs
           register_tiny_sd15() like tiny.
  * full:  the full SD1.5 UNet architecture (~1.7 GB fp16), for GPU speed benchmarks only: speed
           does not depend on weight values.
The VAE is always a random TAESD (ComfyUI recognises it by the 'taesd_decoder.1.weight' key).

Flux.1-dev / SD3-3.5 (MMDiT) all-in-one layouts (diffusion model, CLIP-L (+ CLIP-G), T5, 16-channel
TAESD), tiny widths; both need register_tiny_dit() in the ComfyUI process:
  * tiny_flux: hidden 256 (2 heads of 128), 1 double + 1 single block; T5 64 wide, CLIP-L 32.
  * tiny_sd3:  MMDiT depth 2 (hidden 128), qk rms-norm, x-block self-attention on layer 0;
               CLIP-L 32 + CLIP-G 48, T5 96 wide.
flux_unet_config("full") / sd3_unet_config("full") give Flux.1-dev / SD3.5-medium diffusion-model
kwargs for in-process GPU benches (build_dit_model); no full DiT checkpoint is ever written.

CLI (host venv python; needs ComfyUI, default <pack>/.host/ComfyUI):
  python scripts/random_checkpoints.py --preset tiny|stock|full|tiny_flux|tiny_sd3 OUT.safetensors [--seed N] [--verify]
  python scripts/random_checkpoints.py --test-set DIR   # tiny_sd15 / tiny_flux / tiny_sd3 .safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = PACK_DIR / ".host" / "ComfyUI"


@dataclass(frozen=True)
class ClipShape:
    """Shape of the CLIP-L-style text encoder (only the sizes differ from CLIP-L)."""
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int


@dataclass(frozen=True)
class Preset:
    """UNet + CLIP sizes of one random checkpoint flavour."""
    name: str
    model_channels: int
    context_dim: int              # must equal clip.hidden_size: CLIP output feeds cross-attention
    channel_mult: tuple[int, ...]
    num_heads: int
    clip: ClipShape
    num_res_blocks: int = 1
    attention_levels: int | None = None  # first N levels get a transformer; None = every level


CLIP_L = ClipShape(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12)
TINY = Preset("tiny", model_channels=32, context_dim=64, channel_mult=(1, 2), num_heads=2,
              clip=ClipShape(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=2))
# stock detection only checks model_channels=320 / context_dim=768; depth is read from the keys
STOCK = Preset("stock", model_channels=320, context_dim=768, channel_mult=(1,), num_heads=8, clip=CLIP_L)
# real SD1.5: 4 levels x 2 res blocks, attention on the first 3 levels (none at the 8x8 level)
FULL_SD15 = Preset("full", model_channels=320, context_dim=768, channel_mult=(1, 2, 4, 4), num_heads=8,
                   clip=CLIP_L, num_res_blocks=2, attention_levels=3)
PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, STOCK, FULL_SD15)}
# micro: the tiny layout at 64 channels, trained by scripts/train_micro_model.py. ComfyUI's UNet
# uses GroupNorm(32, ch); at 32 channels every group is one channel, an instance norm that
# erases each channel's spatial mean, so the final GroupNorm leaves the output no way to set a
# latent's overall colour. 64 channels (2 per group) keep it. num_heads stays 2: register_tiny_sd15
# loads small UNets with 2 heads.
MICRO = Preset("micro", model_channels=64, context_dim=64, channel_mult=(1, 2), num_heads=2, clip=TINY.clip)
PRESETS[MICRO.name] = MICRO


def use_comfyui(comfyui_dir: str | os.PathLike | None = None) -> Path:
    """Put a ComfyUI tree on sys.path (so `comfy.*` imports), select CPU mode without CUDA; return its path."""
    d = Path(comfyui_dir or DEFAULT_COMFYUI).resolve()
    if not (d / "comfy" / "sd.py").is_file():
        raise SystemExit(f"ComfyUI not found at {d}; run scripts/setup_host.sh (or pass --comfyui DIR)")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    if not torch.cuda.is_available():
        # must precede the first import of comfy.model_management, which otherwise asks for CUDA
        from comfy.cli_args import args
        args.cpu = True
    return d


def _clip_config(shape: ClipShape) -> dict:
    """ComfyUI's own SD1 CLIP json config with our sizes patched in."""
    import comfy.sd1_clip
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        cfg = json.load(f)
    cfg.update(vars(shape))
    cfg["projection_dim"] = shape.hidden_size
    return cfg


def unet_config(p: Preset) -> dict:
    """UNetModel kwargs for a preset; transformer depths are per block, as ComfyUI lists them."""
    n = len(p.channel_mult)
    att = n if p.attention_levels is None else p.attention_levels
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
        "model_channels": p.model_channels, "num_res_blocks": [p.num_res_blocks] * n,
        "transformer_depth": [int(lvl < att) for lvl in range(n) for _ in range(p.num_res_blocks)],
        "transformer_depth_output": [int(lvl < att) for lvl in range(n) for _ in range(p.num_res_blocks + 1)],
        "channel_mult": list(p.channel_mult), "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": p.context_dim,
        "num_heads": p.num_heads, "num_head_channels": -1,
    }


def _init_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Deterministic init of every float tensor: comfy.ops.disable_weight_init leaves garbage."""
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if t.dim() >= 2:  # fan-in scaling keeps activations O(1), so random outputs stay finite
                t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(t[0].numel()))
            elif name.endswith("bias") or name.endswith("vae_shift"):
                t.zero_()
            else:  # norm weights, vae_scale, logit_scale
                t.fill_(1.0)


def build_state_dict(p: Preset = TINY, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Full SD1.5-layout checkpoint state dict (UNet + CLIP + TAESD) with seeded random weights."""
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, module: torch.nn.Module, keep: str = "") -> None:
        for k, v in module.state_dict().items():
            if k.startswith(keep):
                sd[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()

    # built directly in the target dtype so the full preset never holds an fp32 copy of the UNet
    unet = UNetModel(**unet_config(p), operations=comfy.ops.disable_weight_init, device="cpu", dtype=dtype)
    _init_(unet, gen)
    put("model.diffusion_model.", unet)
    del unet
    clip = comfy.sd1_clip.SDClipModel(textmodel_json_config=_clip_config(p.clip), device="cpu", dtype=dtype)
    _init_(clip, gen)
    put("cond_stage_model.", clip, keep="transformer.text_model.")  # SD1.5 files hold only the text model
    del clip
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    _init_(vae, gen)
    put("first_stage_model.", vae)
    return sd


def write_checkpoint(path: str | os.PathLike, p: Preset | DitPreset = TINY, seed: int = 0,
                     dtype: torch.dtype = torch.float16) -> str:
    """Build a preset and save it as safetensors at `path`; returns the path as str."""
    import safetensors.torch
    sd = build_dit_state_dict(p, seed, dtype) if isinstance(p, DitPreset) else build_state_dict(p, seed, dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return str(path)


# ---- Flux / SD3 (MMDiT) ---------------------------------------------------------------------

@dataclass(frozen=True)
class T5Shape:
    """Sizes of the T5-XXL-style encoder; vocabulary and activation stay T5-XXL's."""
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int


@dataclass(frozen=True)
class DitPreset:
    """A Flux or SD3 all-in-one checkpoint: diffusion model config name plus text-encoder sizes."""
    name: str
    family: str                 # "flux" or "sd3"
    size: str                   # key of flux_unet_config / sd3_unet_config
    clip_l: ClipShape
    t5: T5Shape
    clip_g: ClipShape | None = None
    clip_g_projection: int = 0  # CLIP-G pooled width (text_projection), part of SD3's adm_in_channels


TINY_FLUX = DitPreset(
    "tiny_flux", "flux", "tiny",
    clip_l=ClipShape(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=1),
    t5=T5Shape(d_model=64, num_layers=1, num_heads=2, d_kv=32, d_ff=128))
TINY_SD3 = DitPreset(
    "tiny_sd3", "sd3", "tiny",
    # 3 CLIP layers: SD3 reads CLIP-L/G at layer -2 and SDClipModel asserts abs(layer_idx) < layers
    clip_l=ClipShape(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=1),
    clip_g=ClipShape(hidden_size=48, num_hidden_layers=3, intermediate_size=96, num_attention_heads=1),
    clip_g_projection=48,
    # SD3 pads CLIP-L+G tokens (32 + 48 wide) to the T5 width, so it must be at least their sum;
    # widths kept small because the vocabulary embeddings (49408 / 32128 rows) dominate the file
    t5=T5Shape(d_model=96, num_layers=1, num_heads=2, d_kv=48, d_ff=192))
DIT_PRESETS: dict[str, DitPreset] = {p.name: p for p in (TINY_FLUX, TINY_SD3)}
# file names test hosts give the tiny checkpoints (tests/conftest.py, tests/server/conftest.py)
TEST_CHECKPOINTS: dict[str, Preset | DitPreset] = {
    "tiny_sd15.safetensors": TINY, "tiny_flux.safetensors": TINY_FLUX, "tiny_sd3.safetensors": TINY_SD3}

FLUX_AXES_DIM = [16, 56, 56]  # fixed by model_detection for "flux"; head width = sum = 128


def flux_unet_config(name: str = "tiny") -> dict:
    """Flux.1-dev-layout diffusion model kwargs, exactly what ComfyUI 0.3.75's model detection
    derives from the keys (plus num_heads, which register_tiny_dit's class sets for tiny widths).

    tiny: hidden 256 = 2 heads x 128, 1 double + 1 single block, context 64 (tiny T5), vec 32 (tiny CLIP-L).
    full: Flux.1-dev, hidden 3072, 24 heads, 19 double + 38 single blocks, context 4096, vec 768.
    """
    tiny = {"hidden_size": 256, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "context_in_dim": TINY_FLUX.t5.d_model, "vec_in_dim": TINY_FLUX.clip_l.hidden_size}
    full = {"hidden_size": 3072, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "context_in_dim": 4096, "vec_in_dim": 768}
    sizes = {"tiny": tiny, "full": full}[name]
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "axes_dim": list(FLUX_AXES_DIM), "mlp_ratio": 4.0, "theta": 10000, "qkv_bias": True,
            "guidance_embed": True, **sizes}


def sd3_unet_config(name: str = "tiny") -> dict:
    """SD3/SD3.5-layout MMDiT kwargs as ComfyUI 0.3.75's model detection derives them.

    MMDiT's width is 64 * depth with depth heads (detection reads depth from x_embedder's width).
    tiny: depth 2 (hidden 128), pos-embed grid 32 (512 px), SD3.5-style rms qk-norm and an extra
          x-block self-attention on layer 0; context 96 (tiny T5), adm 32 + 48 (pooled CLIP-L + G).
    full: SD3.5 medium: depth 24 (hidden 1536), grid 384, x-block self-attention on layers 0-12,
          context 4096, adm 2048.
    """
    if name == "tiny":
        depth, grid, xattn = 2, 32, [0]
        ctx, adm = TINY_SD3.t5.d_model, TINY_SD3.clip_l.hidden_size + TINY_SD3.clip_g_projection
    elif name == "full":
        depth, grid, xattn, ctx, adm = 24, 384, list(range(13)), 4096, 2048
    else:
        raise KeyError(name)
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
            "adm_in_channels": adm,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": ctx, "out_features": 64 * depth}},
            "num_patches": grid * grid, "pos_embed_max_size": grid, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": xattn}


def build_dit_model(family: str, name: str = "tiny", dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int | None = 0) -> torch.nn.Module:
    """The bare Flux / MMDiT diffusion model (ComfyUI's class) for a config name; seeded random
    weights unless seed is None (then weights stay uninitialised, enough for speed benchmarks)."""
    import comfy.ops
    if family == "flux":
        from comfy.ldm.flux.model import Flux
        cfg = flux_unet_config(name)
        model = Flux(**cfg, operations=comfy.ops.disable_weight_init, device=device, dtype=dtype)
    elif family == "sd3":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
        model = OpenAISignatureMMDITWrapper(**sd3_unet_config(name), operations=comfy.ops.disable_weight_init,
                                            device=device, dtype=dtype)
    else:
        raise KeyError(family)
    if seed is not None:
        _init_(model, torch.Generator().manual_seed(seed))
    return model


def _t5_config(shape: T5Shape) -> dict:
    """ComfyUI's T5-XXL json config with our sizes patched in."""
    import comfy.text_encoders.sd3_clip as sd3_clip
    with open(os.path.join(os.path.dirname(sd3_clip.__file__), "t5_config_xxl.json")) as f:
        cfg = json.load(f)
    cfg.update(vars(shape))
    return cfg


def _clip_g_config(shape: ClipShape, projection_dim: int) -> dict:
    import comfy.sdxl_clip
    with open(os.path.join(os.path.dirname(comfy.sdxl_clip.__file__), "clip_config_bigg.json")) as f:
        cfg = json.load(f)
    cfg.update(vars(shape))
    cfg["projection_dim"] = projection_dim
    return cfg


def _text_model_options(p: DitPreset) -> dict:
    """model_options that make ComfyUI's stock text encoders take our sizes (it merges
    '<model_name>_model_config' into each encoder's json config)."""
    opts = {"clip_l_model_config": _clip_config(p.clip_l), "t5xxl_model_config": _t5_config(p.t5)}
    if p.clip_g is not None:
        opts["clip_g_model_config"] = _clip_g_config(p.clip_g, p.clip_g_projection)
    return opts


def build_dit_state_dict(p: DitPreset = TINY_FLUX, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All-in-one Flux / SD3 checkpoint state dict (diffusion model + text encoders + 16-channel
    TAESD) in the key layout ComfyUI's CheckpointLoaderSimple expects, with seeded random weights."""
    import comfy.taesd.taesd
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(prefix: str, module: torch.nn.Module) -> None:
        _init_(module, gen)
        for k, v in module.state_dict().items():
            sd[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()

    put("model.diffusion_model.", build_dit_model(p.family, p.size, dtype=dtype, seed=None))
    opts = _text_model_options(p)
    if p.family == "flux":
        import comfy.text_encoders.flux as flux_te
        te = flux_te.FluxClipModel(dtype_t5=dtype, device="cpu", dtype=dtype, model_options=opts)
    else:
        import comfy.text_encoders.sd3_clip as sd3_te
        te = sd3_te.SD3ClipModel(dtype_t5=dtype, device="cpu", dtype=dtype, model_options=opts)
    put("text_encoders.", te)  # process_clip_state_dict strips this, then loads the module's own keys
    # Flux files keep the VAE under "vae.", SD3 ones under the default "first_stage_model."
    # (supported_models.*.vae_key_prefix); ComfyUI reads a TAESD's latent width from its decoder
    put("vae." if p.family == "flux" else "first_stage_model.", comfy.taesd.taesd.TAESD(latent_channels=16))
    return sd


def register_tiny_sd15() -> None:
    """Teach ComfyUI's model detection about SD1.5-layout UNets with small widths (idempotent).

    Matches SD1.5-shaped UNets with context_dim not a real one and model_channels < 320, so the
    stock SD15 class keeps handling real checkpoints; the CLIP size is read from the checkpoint.
    """
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    if any(getattr(m, "_tiny_sd15", False) for m in sm.models):
        return

    class TinySD15(sm.SD15):
        _tiny_sd15 = True
        unet_config = {"use_linear_in_transformer": False, "adm_in_channels": None,
                       "use_temporal_attention": False, "in_channels": 4}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

        @classmethod
        def matches(cls, unet_config, state_dict=None):
            if not super().matches(unet_config, state_dict):
                return False
            return (unet_config.get("context_dim") not in (None, 768, 1024, 2048)
                    and unet_config.get("model_channels", 0) < 320)

        def clip_target(self, state_dict={}):
            pre = "cond_stage_model.transformer.text_model."
            emb = state_dict.get(pre + "embeddings.token_embedding.weight")
            if emb is None:
                return super().clip_target(state_dict)
            layers = 0
            while any(k.startswith(f"{pre}encoder.layers.{layers}.") for k in state_dict):
                layers += 1
            hidden = emb.shape[1]
            conf = {"hidden_size": hidden, "num_hidden_layers": layers,
                    "intermediate_size": state_dict[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0],
                    "num_attention_heads": max(1, hidden // 32), "projection_dim": hidden}

            class TinyClip(sd1_clip.SD1ClipModel):
                def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
                    model_options = {**model_options, "clip_l_model_config": conf}
                    super().__init__(device=device, dtype=dtype, model_options=model_options, **kw)

            class TinyTok(sd1_clip.SD1Tokenizer):
                def __init__(self, embedding_directory=None, tokenizer_data={}):
                    super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
                    self.clip_l.embedding_size = hidden  # embeddings/textual inversion width check

            return smb.ClipTarget(TinyTok, TinyClip)

    sm.models.insert(0, TinySD15)  # first, so it is tried before the stock classes


def _count(state_dict: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state_dict):
        n += 1
    return n


def _clip_sizes_from_sd(state_dict: dict, pre: str) -> dict:
    """CLIP config sizes of the encoder under `pre` (…clip_l.transformer.). Head count is not in
    the weights; the tiny presets use 32-wide heads, as register_tiny_sd15 assumes too."""
    hidden = state_dict[pre + "text_model.embeddings.token_embedding.weight"].shape[1]
    conf = {"hidden_size": hidden, "num_hidden_layers": _count(state_dict, pre + "text_model.encoder.layers."),
            "intermediate_size": state_dict[pre + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_attention_heads": max(1, hidden // 32), "projection_dim": hidden}
    proj = state_dict.get(pre + "text_projection.weight")
    if proj is not None:
        conf["projection_dim"] = proj.shape[0]
    return conf


def _t5_sizes_from_sd(state_dict: dict, pre: str) -> dict:
    """T5 config sizes of the encoder under `pre` (…t5xxl.transformer.)."""
    att = pre + "encoder.block.0.layer.0.SelfAttention."
    heads = state_dict[att + "relative_attention_bias.weight"].shape[1]
    return {"d_model": state_dict[pre + "shared.weight"].shape[1],
            "num_layers": _count(state_dict, pre + "encoder.block."), "num_heads": heads,
            "d_kv": state_dict[att + "q.weight"].shape[0] // heads,
            "d_ff": state_dict[pre + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]}


def register_tiny_dit() -> None:
    """Teach ComfyUI's model detection about tiny Flux.1-dev and SD3/3.5 checkpoints (idempotent).

    Subclasses of the stock Flux / SD3 classes go first in comfy.supported_models.models and match
    only tiny widths (Flux hidden < 1024, MMDiT depth < 8; real ones are 3072 and 24/38), so real
    checkpoints keep the stock classes. Their text encoders are the stock FluxClipModel /
    SD3ClipModel with CLIP / T5 sizes read from the checkpoint.
    """
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    import comfy.text_encoders.flux as flux_te
    import comfy.text_encoders.sd3_clip as sd3_te
    if any(getattr(m, "_tiny_dit", False) for m in sm.models):
        return

    def te_options(state_dict: dict, pre: str, names: tuple[str, ...]) -> dict:
        opts = {}
        for n in names:
            sizes = (_t5_sizes_from_sd if n == "t5xxl" else _clip_sizes_from_sd)(state_dict, f"{pre}{n}.transformer.")
            opts[f"{n}_model_config"] = sizes  # merged by SDClipModel into the stock json config
        return opts

    def fit_tokenizer(tok: object, opts: dict) -> None:
        # embedding_size guards textual-inversion embeddings: it must be the tiny width
        for n, conf in opts.items():
            getattr(tok, n[:-len("_model_config")]).embedding_size = conf.get("hidden_size", conf.get("d_model"))

    class TinyFlux(sm.Flux):
        _tiny_dit = True
        unet_config = {**sm.Flux.unet_config, "in_channels": 16}

        @classmethod
        def matches(cls, unet_config, state_dict=None):
            return super().matches(unet_config, state_dict) and unet_config.get("hidden_size", 3072) < 1024

        def __init__(self, unet_config):
            super().__init__(unet_config)
            # detection hard-codes Flux.1's 24 heads; the head width must stay sum(axes_dim) = 128
            self.unet_config["num_heads"] = self.unet_config["hidden_size"] // sum(self.unet_config["axes_dim"])

        def clip_target(self, state_dict={}):
            pre = self.text_encoder_key_prefix[0]
            if pre + "t5xxl.transformer.shared.weight" not in state_dict:
                return super().clip_target(state_dict)
            opts = te_options(state_dict, pre, ("clip_l", "t5xxl"))
            t5_detect = sd3_te.t5_xxl_detect(state_dict, f"{pre}t5xxl.transformer.")

            class TinyFluxClip(flux_te.FluxClipModel):
                def __init__(self, device="cpu", dtype=None, model_options={}):
                    super().__init__(dtype_t5=t5_detect.get("dtype_t5"), device=device, dtype=dtype,
                                     model_options={**model_options, **opts})

            class TinyFluxTok(flux_te.FluxTokenizer):
                def __init__(self, embedding_directory=None, tokenizer_data={}):
                    super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
                    fit_tokenizer(self, opts)

            return smb.ClipTarget(TinyFluxTok, TinyFluxClip)

    class TinySD3(sm.SD3):
        _tiny_dit = True

        @classmethod
        def matches(cls, unet_config, state_dict=None):
            return super().matches(unet_config, state_dict) and unet_config.get("depth", 24) < 8

        def clip_target(self, state_dict={}):
            pre = self.text_encoder_key_prefix[0]
            names = ("clip_l", "clip_g", "t5xxl")
            if any(f"{pre}{n}.transformer.text_model.final_layer_norm.weight" not in state_dict for n in names[:2]) \
                    or f"{pre}t5xxl.transformer.shared.weight" not in state_dict:
                return super().clip_target(state_dict)
            opts = te_options(state_dict, pre, names)
            t5_detect = sd3_te.t5_xxl_detect(state_dict, f"{pre}t5xxl.transformer.")

            class TinySD3Clip(sd3_te.SD3ClipModel):
                def __init__(self, device="cpu", dtype=None, model_options={}):
                    super().__init__(clip_l=True, clip_g=True, t5=True, dtype_t5=t5_detect.get("dtype_t5"),
                                     device=device, dtype=dtype, model_options={**model_options, **opts})

                def encode_token_weights(self, token_weight_pairs):
                    # the stock method pads CLIP-L+G tokens to a hard-coded 4096 (T5-XXL's width);
                    # here they are padded to the tiny T5's width, otherwise the same computation
                    l_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
                    g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])
                    cut = min(l_out.shape[1], g_out.shape[1])
                    lg_out = torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1)
                    t5_output = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"])
                    t5_out = t5_output[0]
                    extra = {"attention_mask": t5_output[2]["attention_mask"]} if self.t5_attention_mask else {}
                    lg_out = torch.nn.functional.pad(lg_out, (0, t5_out.shape[-1] - lg_out.shape[-1]))
                    return torch.cat([lg_out, t5_out], dim=-2), torch.cat((l_pooled, g_pooled), dim=-1), extra

            class TinySD3Tok(sd3_te.SD3Tokenizer):
                def __init__(self, embedding_directory=None, tokenizer_data={}):
                    super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
                    fit_tokenizer(self, opts)

            return smb.ClipTarget(TinySD3Tok, TinySD3Clip)

    # first, so they are tried before the stock classes
    sm.models.insert(0, TinySD3)
    sm.models.insert(0, TinyFlux)


def detect(path: str | os.PathLike) -> str:
    """Load a checkpoint with ComfyUI's stock loader and return the detected model class name."""
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[0]
    return type(model.model.model_config).__name__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="output .safetensors path")
    ap.add_argument("--test-set", metavar="DIR", help="instead of OUT: write every TEST_CHECKPOINTS file into DIR "
                    "(one process, so a test server's fixture pays ComfyUI's import once)")
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(DIT_PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--comfyui", default=None, help=f"ComfyUI dir (default {DEFAULT_COMFYUI})")
    ap.add_argument("--verify", action="store_true", help="load it back with ComfyUI and print the detected class")
    a = ap.parse_args(argv)
    if (a.out is None) == (a.test_set is None):
        ap.error("give exactly one of OUT and --test-set DIR")
    use_comfyui(a.comfyui)
    if a.test_set:
        for name, preset in TEST_CHECKPOINTS.items():
            t = time.time()
            write_checkpoint(os.path.join(a.test_set, name), preset, a.seed)
            print(f"wrote {name} (preset {preset.name}) in {time.time() - t:.1f}s")
        return 0
    t = time.time()
    write_checkpoint(a.out, PRESETS.get(a.preset) or DIT_PRESETS[a.preset], a.seed,
                     torch.float16 if a.dtype == "fp16" else torch.float32)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MiB, preset {a.preset}, seed {a.seed}) "
          f"in {time.time() - t:.1f}s")
    if a.verify:
        if a.preset == "tiny":
            register_tiny_sd15()
        if a.preset in DIT_PRESETS:
            register_tiny_dit()
        t = time.time()
        print(f"detected as {detect(a.out)} in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
