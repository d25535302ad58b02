"""SDXL: 2048-wide context, two transformer blocks per level, pooled output. A small random UNet
with SDXL's layout is built from ComfyUI's own SDXL model class (no CLIP needed: the palette
is encoded with a fixed random text encoder)."""

import hashlib
import math

import pytest
import torch

SIZE = 128


def small_sdxl():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm

    unet = {"model_channels": 32, "use_linear_in_transformer": True, "transformer_depth": [0, 2], "context_dim": 2048,
            "adm_in_channels": 2816, "use_temporal_attention": False, "use_temporal_resblock": False,
            "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
            "transformer_depth_middle": 2, "transformer_depth_output": [0, 0, 2, 2], "num_head_channels": 16,
            "num_heads": -1, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
            "num_classes": "sequential", "use_checkpoint": False}
    config = sm.SDXL(unet)
    model = config.get_model({}, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # comfy's layers skip weight init: fill everything explicitly
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def encode(text):
    g = torch.Generator().manual_seed(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16))
    return torch.randn(1, 77, 2048, generator=g)


def cond(text):
    g = torch.Generator().manual_seed(1 + int(hashlib.sha1(text.encode()).hexdigest()[:8], 16))
    return [[encode(text), {"pooled_output": torch.randn(1, 1280, generator=g)}]]


@pytest.fixture(scope="module")
def sdxl(comfy_host):
    return small_sdxl()


def sample(host, model, positive, cfg):
    latent = host.nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    return host.nodes.KSampler().sample(model, 5, 3, cfg, "euler", "normal", positive, cond("blurry"), latent)[0]["samples"]


def palette_of(host, specs, background="a meadow"):
    core = host.pack_module("rcca_core")
    return core.Palette.build([core.RegionSpec(p, m) for p, m in specs], background, SIZE, SIZE, encode)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_sdxl_full_canvas_region_equals_plain_sampling(comfy_host, sdxl, cfg):
    palette = palette_of(comfy_host, [("a red fox", torch.ones(SIZE, SIZE))])
    patch = comfy_host.nodes.NODE_CLASS_MAPPINGS["RCCAAttentionPatch"]
    patched = patch.execute(sdxl, palette, "soft", 0.0, 1.0, "all").result[0]
    background = cond("a meadow")
    plain = [[encode("a red fox"), background[0][1]]]  # same pooled output: RCCA changes cross-attention only
    got = sample(comfy_host, patched, background, cfg)
    torch.testing.assert_close(got, sample(comfy_host, sdxl, plain, cfg), atol=1e-5, rtol=0)
    assert (got - sample(comfy_host, sdxl, background, cfg)).abs().max() > 1e-3


def test_sdxl_regions_reach_every_transformer_block(comfy_host, sdxl):
    left = torch.zeros(SIZE, SIZE)
    left[:, : SIZE // 2] = 1
    palette = palette_of(comfy_host, [("a red fox", left), ("a blue car", 1 - left)])
    patch = comfy_host.nodes.NODE_CLASS_MAPPINGS["RCCAAttentionPatch"]
    patched = patch.execute(sdxl, palette, "hard", 0.0, 1.0, "all").result[0].clone()
    extended = []

    def spy(func, q, k, v, heads, **kw):
        extended.append((kw["transformer_options"]["block"], kw["transformer_options"]["block_index"], k.shape[1]))
        return func(q, k, v, heads, **kw)

    # an override installed after ours sees the extended context in every cross-attention layer
    rcca_override = patched.model_options["transformer_options"]["optimized_attention_override"]
    patched.model_options["transformer_options"]["optimized_attention_override"] = \
        lambda func, *a, **kw: rcca_override(lambda *a2, **kw2: spy(func, *a2, **kw2), *a, **kw)
    out = sample(comfy_host, patched, cond("a meadow"), 1.0)
    assert torch.isfinite(out).all()
    cross = {(b[0], b[1], i) for b, i, n in extended if n == 3 * 77}
    layers = set(comfy_host.pack_module("rcca_core").attention.cross_attention_layers(sdxl.model.diffusion_model))
    assert len(layers) == 2 * 1 + 2 + 2 * 2 and any(i == 1 for _, _, i in layers)  # depth 2 everywhere: index 1 exists
    assert cross == layers
