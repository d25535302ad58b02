"""Tiny random Flux.1-dev and SD3/3.5 all-in-one checkpoints (scripts/random_checkpoints.py) load
through CheckpointLoaderSimple in the real ComfyUI host, are detected as (subclasses of) the stock
Flux / SD3 classes, and their CLIP, sampler and VAE paths run end to end with the stock nodes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import random_checkpoints as rc  # noqa: E402

# names tests/conftest.py writes them under (TINY_FLUX_CKPT / TINY_SD3_CKPT there); "conftest" is
# not importable by name here (tests/server has one too)
TINY_FLUX_CKPT = "tiny_flux.safetensors"
TINY_SD3_CKPT = "tiny_sd3.safetensors"


def _encode(host, clip, text: str) -> list:
    return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def _sample(host, model, positive, negative, width: int, height: int, cfg: float) -> torch.Tensor:
    latent = host.nodes.EmptyLatentImage().generate(width, height, 1)[0]
    out = host.nodes.KSampler().sample(model, seed=0, steps=2, cfg=cfg, sampler_name="euler", scheduler="simple",
                                       positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]
    return out["samples"]


def _flux_guidance(host, cond: list, guidance: float = 3.5) -> list:
    out = host.nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(cond, guidance)
    return out[0] if isinstance(out, tuple) else out.result[0]


def test_detected_as_tiny_subclasses_of_stock_classes(comfy_host):
    import comfy.supported_models as sm
    import comfy.text_encoders.flux as flux_te
    import comfy.text_encoders.sd3_clip as sd3_te
    for name, stock, te_cls in ((TINY_FLUX_CKPT, sm.Flux, flux_te.FluxClipModel),
                                (TINY_SD3_CKPT, sm.SD3, sd3_te.SD3ClipModel)):
        model, clip, vae = comfy_host.load_checkpoint(name)
        config = model.model.model_config
        assert isinstance(config, stock) and type(config) is not stock, type(config)
        assert isinstance(clip.cond_stage_model, te_cls), type(clip.cond_stage_model)
        assert vae.latent_channels == 16


def test_detected_config_is_the_built_config(comfy_host):
    flux = comfy_host.load_checkpoint(TINY_FLUX_CKPT)[0].model.model_config.unet_config
    assert {k: flux[k] for k in rc.flux_unet_config("tiny")} == rc.flux_unet_config("tiny")
    sd3 = comfy_host.load_checkpoint(TINY_SD3_CKPT)[0].model.model_config.unet_config
    assert {k: sd3[k] for k in rc.sd3_unet_config("tiny")} == rc.sd3_unet_config("tiny")


def test_flux_encode_sample_decode(comfy_host):
    model, clip, vae = comfy_host.load_checkpoint(TINY_FLUX_CKPT)
    cond = _encode(comfy_host, clip, "a red apple on a table")
    ctx, extra = cond[0]
    # FluxTokenizer pads T5 to 256 tokens; width is the tiny T5's = the model's context_in_dim
    assert tuple(ctx.shape) == (1, 256, rc.TINY_FLUX.t5.d_model)
    assert tuple(extra["pooled_output"].shape) == (1, rc.flux_unet_config()["vec_in_dim"])
    positive = _flux_guidance(comfy_host, cond)
    assert positive[0][1]["guidance"] == 3.5
    negative = _encode(comfy_host, clip, "")
    for w, h in ((64, 64), (72, 56)):  # 72x56 px -> 9x7 latent: Flux pads to whole 2x2 patches
        samples = _sample(comfy_host, model, positive, negative, w, h, cfg=1.0)
        assert tuple(samples.shape) == (1, 16, h // 8, w // 8)
        assert torch.isfinite(samples).all()
        image = comfy_host.nodes.VAEDecode().decode(vae, {"samples": samples})[0]
        assert tuple(image.shape) == (1, h, w, 3) and torch.isfinite(image).all()


def test_sd3_encode_sample_decode(comfy_host):
    model, clip, vae = comfy_host.load_checkpoint(TINY_SD3_CKPT)
    positive = _encode(comfy_host, clip, "a red apple on a table")
    negative = _encode(comfy_host, clip, "blurry")
    ctx, extra = positive[0]
    # 77 CLIP-L+G tokens (padded to the T5 width) then 77 T5 tokens
    assert tuple(ctx.shape) == (1, 154, rc.TINY_SD3.t5.d_model)
    assert tuple(extra["pooled_output"].shape) == (1, rc.sd3_unet_config()["adm_in_channels"])
    samples = _sample(comfy_host, model, positive, negative, 64, 64, cfg=2.0)
    assert tuple(samples.shape) == (1, 16, 8, 8) and torch.isfinite(samples).all()
    image = comfy_host.nodes.VAEDecode().decode(vae, {"samples": samples})[0]
    assert tuple(image.shape) == (1, 64, 64, 3) and torch.isfinite(image).all()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_full_configs_build_meta_models(comfy_host, family):
    """The `full` configs instantiate (on the meta device: no memory) with the real sizes."""
    model = rc.build_dit_model(family, "full", dtype=torch.bfloat16, device="meta", seed=None)
    n = sum(p.numel() for p in model.parameters())
    # Flux.1-dev ~11.9 B parameters, SD3.5 medium ~2.2-2.5 B
    assert (11.5e9 < n < 12.5e9) if family == "flux" else (2.0e9 < n < 2.6e9), n


def test_real_sizes_keep_the_stock_classes(comfy_host):
    """register_tiny_dit's classes come first but leave real Flux.1-dev / SD3.5-medium widths alone."""
    import comfy.model_detection as md
    assert type(md.model_config_from_unet_config(rc.flux_unet_config("full"))).__name__ == "Flux"
    assert type(md.model_config_from_unet_config(rc.sd3_unet_config("full"))).__name__ == "SD3"
