#!/usr/bin/env python3
"""Random-weight LoRA files for a ComfyUI model, with ComfyUI's own key names (no downloads).

Keys are kohya-style `lora_unet_<module path with _>` names, which comfy.lora.model_lora_keys_unet
maps for every UNet, with `.lora_down.weight`, `.lora_up.weight` and `.alpha` tensors; convolutions
get LoCon factors (down: the layer's kernel, up: 1 x 1). Tests write them for the tiny checkpoint.

CLI (host venv python; needs ComfyUI, default <pack>/.host/ComfyUI):
  python scripts/random_lora.py CHECKPOINT OUT.safetensors [--seed N] [--rank R] [--kinds attention,ff,proj,conv,emb]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

KINDS = ("attention", "ff", "proj", "conv", "emb")


def kind_of(name: str) -> str | None:
    """Which part of a UNet a module path belongs to (None: not a LoRA target here)."""
    if ".attn1." in name or ".attn2." in name:
        return "attention"
    if ".ff.net." in name:
        return "ff"
    if name.endswith(".proj_in") or name.endswith(".proj_out"):
        return "proj"
    if name.endswith(".in_layers.2") or name.endswith(".out_layers.3"):
        return "conv"
    if name.endswith(".emb_layers.1"):
        return "emb"
    return None


def random_lora(base_model, seed: int = 0, rank: int = 4, kinds: tuple[str, ...] = KINDS,
                scale: float = 0.5, only: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA state dict for a ComfyUI BaseModel: every weight of the chosen kinds gets random
    low-rank factors whose product is about `scale` times the size of a unit-variance layer;
    `only`: keep modules whose path contains this text."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, weight in base_model.state_dict().items():
        if not key.startswith("diffusion_model.") or not key.endswith(".weight") or weight.ndim not in (2, 4):
            continue
        name = key[len("diffusion_model."):-len(".weight")]
        if kind_of(name) not in kinds or (only is not None and only not in name):
            continue
        fan_in = weight[0].numel()
        r = min(rank, weight.shape[0], weight.shape[1])
        down_shape = (r,) + tuple(weight.shape[1:])
        up_shape = (weight.shape[0], r) + ((1, 1) if weight.ndim == 4 else ())
        prefix = "lora_unet_" + name.replace(".", "_")
        out[f"{prefix}.lora_down.weight"] = torch.randn(down_shape, generator=gen) / math.sqrt(fan_in)
        out[f"{prefix}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * scale / math.sqrt(r)
        out[f"{prefix}.alpha"] = torch.tensor(float(r))
    if not out:
        raise ValueError(f"no weight of kinds {kinds} in this model")
    return out


def write_lora(path: str | os.PathLike, base_model, **kw) -> str:
    import safetensors.torch
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in random_lora(base_model, **kw).items()}, str(path))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="checkpoint file the LoRA is for")
    ap.add_argument("out", nargs="+", help="output .safetensors path(s); the n-th gets seed + n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--comfyui", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import random_checkpoints
    random_checkpoints.use_comfyui(a.comfyui)
    random_checkpoints.register_tiny_sd15()
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=False, output_clip=False)[0]
    for n, out in enumerate(a.out):
        write_lora(out, model.model, seed=a.seed + n, rank=a.rank, kinds=tuple(k for k in a.kinds.split(",") if k))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
