#!/usr/bin/env python3
"""Random-weight SD1.5-layout checkpoints built with ComfyUI's own classes (no downloads).

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

CLI (host venv python; needs ComfyUI, default <pack>/.host/ComfyUI):
  python scripts/random_checkpoints.py --preset tiny|stock|full OUT.safetensors [--seed N] [--verify]
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


def write_checkpoint(path: str | os.PathLike, p: Preset = TINY, seed: int = 0,
                     dtype: torch.dtype = torch.float16) -> str:
    """Build a preset and save it as safetensors at `path`; returns the path as str."""
    import safetensors.torch
    sd = build_state_dict(p, seed, dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return str(path)


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


def detect(path: str | os.PathLike) -> str:
    """Load a checkpoint with ComfyUI's stock loader and return the detected model class name."""
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)[0]
    return type(model.model.model_config).__name__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .safetensors path")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--comfyui", default=None, help=f"ComfyUI dir (default {DEFAULT_COMFYUI})")
    ap.add_argument("--verify", action="store_true", help="load it back with ComfyUI and print the detected class")
    a = ap.parse_args(argv)
    use_comfyui(a.comfyui)
    t = time.time()
    write_checkpoint(a.out, PRESETS[a.preset], a.seed, torch.float16 if a.dtype == "fp16" else torch.float32)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 2**20:.1f} MiB, preset {a.preset}, seed {a.seed}) "
          f"in {time.time() - t:.1f}s")
    if a.verify:
        if a.preset == "tiny":
            register_tiny_sd15()
        t = time.time()
        print(f"detected as {detect(a.out)} in {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
