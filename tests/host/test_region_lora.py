"""Region LoRAs, regions from a CONDITIONING and region weights on the real host (tiny random
SD1.5, fp32 CPU, core KSampler): the properties of rcca_core.region_lora's formulation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import random_lora  # noqa: E402

SIZE = 256  # a 32 x 32 latent: levels 32 / 16, the halves stay aligned


def node(host, node_id):
    return host.nodes.NODE_CLASS_MAPPINGS[node_id]


def result(out):
    return out.result if hasattr(out, "result") else out


@pytest.fixture(scope="module")
def loras(comfy_host):
    """Random LoRA files for the tiny checkpoint, and two that do not fit it."""
    folder = comfy_host.random_loras(["style_a.safetensors", "style_b.safetensors"])
    comfy_host.random_loras(["attn_a.safetensors", "attn_b.safetensors"], kinds=("attention",))
    import safetensors.torch

    foreign = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8)}
    safetensors.torch.save_file(foreign, str(folder / "flux_style.safetensors"))
    base = comfy_host.load_tiny()[0].model
    wider = {k: (torch.zeros(v.shape[0], v.shape[1] * 2, *v.shape[2:]) if k.endswith("lora_down.weight") else v)
             for k, v in random_lora.random_lora(base, seed=5).items()}  # factors for a layer twice as wide
    safetensors.torch.save_file(wider, str(folder / "wider_model.safetensors"))
    return folder


def region_lora(host, name, strength=1.0, chain=None):
    return result(node(host, "RCCARegionLoRA").execute(name, strength, lora=chain))[0]


def palette(host, regions, background="a sunny meadow"):
    _, clip, _ = host.load_tiny()
    chain = None
    for spec in regions:
        spec = dict(spec)
        mask = spec.pop("mask")
        prompt = spec.pop("prompt", "")
        strength = spec.pop("strength", 1.0)
        chain = result(node(host, "RCCAAddRegion").execute(mask, prompt, strength, regions=chain, **spec))[0]
    return result(node(host, "RCCARegionalPromptPalette").execute(clip, background, SIZE, SIZE, chain))


def patch(host, model, pal, mode="soft"):
    return result(node(host, "RCCAAttentionPatch").execute(model, pal, mode, 0.0, 1.0, "all"))[0]


def sample(host, model, positive, negative, cfg=1.0, steps=2, seed=0):
    latent = host.nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    return host.nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]["samples"]


def global_lora(host, model, name, strength=1.0):
    return host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def full():
    return torch.ones(1, SIZE, SIZE)


def halves():
    left = torch.zeros(1, SIZE, SIZE)
    left[..., : SIZE // 2] = 1
    return left, 1 - left


def test_full_canvas_region_lora_equals_the_lora_loaded_globally(comfy_host, loras):
    """Every kind of layer (attention, feed-forward, proj, 3 x 3 convs, the time embedding) at
    cfg 1; and with a global LoRA already on the model, the region's comes on top."""
    model, clip, _ = comfy_host.load_tiny()
    pal, background, _ = palette(comfy_host, [dict(mask=full(), prompt="a red fox",
                                                   lora=region_lora(comfy_host, "style_a.safetensors", 0.8))])
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    got = sample(comfy_host, patch(comfy_host, model, pal), background, negative)
    plain_pal, _, _ = palette(comfy_host, [dict(mask=full(), prompt="a red fox")])
    want = sample(comfy_host, patch(comfy_host, global_lora(comfy_host, model, "style_a.safetensors", 0.8), plain_pal),
                  background, negative)
    # W x + D x against (W + D) x: the same sum in another order, rounded over 2 steps of every layer
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    without = sample(comfy_host, patch(comfy_host, model, plain_pal), background, negative)
    assert (want - without).abs().max() > 50 * (got - want).abs().max()  # the LoRA's effect dwarfs the rounding
    on_top = sample(comfy_host, patch(comfy_host, global_lora(comfy_host, model, "style_b.safetensors"), pal),
                    background, negative)
    both = global_lora(comfy_host, global_lora(comfy_host, model, "style_b.safetensors"), "style_a.safetensors", 0.8)
    torch.testing.assert_close(on_top, sample(comfy_host, patch(comfy_host, both, plain_pal), background, negative),
                               atol=1e-3, rtol=0)


def test_zero_strength_is_no_lora(comfy_host, loras):
    model, clip, _ = comfy_host.load_tiny()
    left, right = halves()
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    pal, background, _ = palette(comfy_host, [dict(mask=left, prompt="a fox",
                                                   lora=region_lora(comfy_host, "style_a.safetensors", 0.0))])
    plain, _, _ = palette(comfy_host, [dict(mask=left, prompt="a fox")])
    torch.testing.assert_close(sample(comfy_host, patch(comfy_host, model, pal), background, negative),
                               sample(comfy_host, patch(comfy_host, model, plain), background, negative), atol=0, rtol=0)


def first_attention_queries(host, model, pal, background, negative):
    """q of the first self-attention (its to_q is the first LoRA'd layer of an attention-only LoRA)."""
    seen = []

    def recorder(func, q, k, v, heads, **kwargs):
        if not seen:
            seen.append(q.detach().clone())
        return func(q, k, v, heads, **kwargs)

    base = model.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    sample(host, patch(host, base, pal, mode="hard"), background, negative, steps=1)
    return seen[0]


def test_hard_disjoint_regions_do_not_see_each_others_lora(comfy_host, loras):
    model, clip, _ = comfy_host.load_tiny()
    left, right = halves()
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    qs = []
    for other in ("attn_a.safetensors", "attn_b.safetensors"):
        pal, background, _ = palette(comfy_host, [
            dict(mask=left, prompt="a fox", lora=region_lora(comfy_host, "attn_a.safetensors")),
            dict(mask=right, prompt="a car", lora=region_lora(comfy_host, other))])
        qs.append(first_attention_queries(comfy_host, model, pal, background, negative).reshape(1, 32, 32, -1))
    torch.testing.assert_close(qs[0][:, :, :16], qs[1][:, :, :16], atol=1e-6, rtol=0)  # the fox's half
    assert not torch.allclose(qs[0][:, :, 16:], qs[1][:, :, 16:], atol=1e-4)


def test_two_region_loras_in_one_model_call_per_step(comfy_host, loras):
    model, clip, _ = comfy_host.load_tiny()
    left, right = halves()
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    stacked = region_lora(comfy_host, "attn_b.safetensors", 0.5, chain=region_lora(comfy_host, "style_a.safetensors"))
    pal, background, _ = palette(comfy_host, [
        dict(mask=left, prompt="a fox", lora=stacked),
        dict(mask=right, prompt="a car", lora=region_lora(comfy_host, "style_b.safetensors"))])
    patched = patch(comfy_host, model, pal)
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        out = sample(comfy_host, patched, background, negative, steps=3)
    finally:
        handle.remove()
    assert calls == [1, 1, 1]  # one UNet call of one row per step at cfg 1, whatever the LoRA count
    assert torch.isfinite(out).all()
    assert not model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q._forward_hooks


def test_bad_loras_are_refused_before_sampling(comfy_host, loras):
    model, _, _ = comfy_host.load_tiny()
    with pytest.raises(Exception, match="Region LoRA: no LoRA file 'missing.safetensors'"):
        region_lora(comfy_host, "missing.safetensors")
    for name, match in (("flux_style.safetensors", "2 of its 2 keys fit no layer .* another model family"),
                        ("wider_model.safetensors", "do not fit the layer's weight .* LoRA for another model")):
        pal, _, _ = palette(comfy_host, [dict(mask=full(), prompt="a fox", lora=region_lora(comfy_host, name))])
        with pytest.raises(ValueError, match=match):
            patch(comfy_host, model, pal)
    flux, _, _ = comfy_host.load_checkpoint("tiny_flux.safetensors")
    _, flux_clip, _ = comfy_host.load_checkpoint("tiny_flux.safetensors")
    regions = result(node(comfy_host, "RCCAAddRegion").execute(full(), "a fox", 1.0,
                                                               lora=region_lora(comfy_host, "style_a.safetensors")))[0]
    flux_pal = result(node(comfy_host, "RCCARegionalPromptPalette").execute(flux_clip, "bg", 64, 64, regions))[0]
    with pytest.raises(ValueError, match="region LoRAs .* work on SD1.5 / SDXL"):
        result(node(comfy_host, "RCCAAttentionPatch").execute(flux, flux_pal, "soft", 0.0, 1.0, "all"))


def test_region_from_a_conditioning_equals_its_prompt(comfy_host):
    model, clip, _ = comfy_host.load_tiny()
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    fox = comfy_host.nodes.CLIPTextEncode().encode(clip, "a red fox")[0]
    left, right = halves()
    by_text, background, _ = palette(comfy_host, [dict(mask=left, prompt="a red fox")])
    by_cond, _, _ = palette(comfy_host, [dict(mask=left, prompt="", conditioning=fox, name="fox")])
    torch.testing.assert_close(sample(comfy_host, patch(comfy_host, model, by_cond), background, negative),
                               sample(comfy_host, patch(comfy_host, model, by_text), background, negative),
                               atol=0, rtol=0)
    assert by_cond.regions[0].spec.prompt == "fox"  # the label
    full_cond, _, _ = palette(comfy_host, [dict(mask=full(), conditioning=fox)])
    plain = sample(comfy_host, model, [[fox[0][0], dict(background[0][1])]], negative)
    torch.testing.assert_close(sample(comfy_host, patch(comfy_host, model, full_cond), background, negative), plain,
                               atol=1e-5, rtol=0)
    masked = [[fox[0][0], {**fox[0][1], "attention_mask": torch.ones(1, 77)}]]
    with pytest.raises(ValueError, match="carries an attention mask"):
        palette(comfy_host, [dict(mask=left, conditioning=masked)])
    with pytest.raises(ValueError, match="one entry, this one has 2"):
        palette(comfy_host, [dict(mask=left, conditioning=fox + fox)])
    _, sd3_clip, _ = comfy_host.load_checkpoint("tiny_sd3.safetensors")
    wide = comfy_host.nodes.CLIPTextEncode().encode(sd3_clip, "a red fox")[0]
    with pytest.raises(ValueError, match="96 wide but the background's are 64"):
        palette(comfy_host, [dict(mask=left, conditioning=wide)])


def test_region_weight_changes_mixed_pixels_only(comfy_host):
    model, clip, _ = comfy_host.load_tiny()
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "")[0]
    left, _ = halves()
    painted, background, _ = palette(comfy_host, [dict(mask=left, prompt="a fox")])
    heavy, _, _ = palette(comfy_host, [dict(mask=left, prompt="a fox", weight=2.0)])
    # hard partition: every pixel reads one prompt, so log w is a constant of the row (rounding only)
    hard = (sample(comfy_host, patch(comfy_host, model, heavy, "hard"), background, negative)
            - sample(comfy_host, patch(comfy_host, model, painted, "hard"), background, negative)).abs().max()
    soft, _, _ = palette(comfy_host, [dict(mask=left * 0.5, prompt="a fox")])
    soft_heavy, _, _ = palette(comfy_host, [dict(mask=left * 0.5, prompt="a fox", weight=2.0)])
    mixed = (sample(comfy_host, patch(comfy_host, model, soft_heavy), background, negative)
             - sample(comfy_host, patch(comfy_host, model, soft), background, negative)).abs().max()
    assert hard < 1e-3 and mixed > 20 * hard, (float(hard), float(mixed))


def test_stream_slots_carry_their_palettes_loras(comfy_host, loras):
    """A timeline whose first state has a full-canvas region LoRA and whose second has none: while
    the pipe holds frames of both, each slot gets its own palette's LoRA in the one batched call."""
    size = 128
    model, clip, _ = comfy_host.load_tiny()
    full_small = torch.ones(1, size, size)

    def pal(lora=None):
        regions = result(node(comfy_host, "RCCAAddRegion").execute(full_small, "a red fox", 1.0, lora=lora))[0]
        return result(node(comfy_host, "RCCARegionalPromptPalette").execute(clip, "a meadow", size, size, regions))

    with_lora, background, _ = pal(region_lora(comfy_host, "style_a.safetensors"))
    plain, _, _ = pal()

    def run(model_, *states):
        tl = None
        for p, frames in states:
            tl = result(node(comfy_host, "RCCAPaletteTimeline").execute(p, frames, timeline=tl))[0]
        latent = comfy_host.nodes.EmptyLatentImage().generate(size, size, 6)[0]
        negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        return result(node(comfy_host, "RCCAStreamBatchLCMSampler").execute(
            model_, background, negative, latent, "0, 12, 24, 36", 50, 3, "rcca", "none", 1.0, "eager", "latent2rgb",
            timeline=tl))[0]["samples"]

    edited = run(model, (with_lora, 3), (plain, 3))
    lora_model = global_lora(comfy_host, model, "style_a.safetensors")
    want_first = run(lora_model, (plain, 6))[:3]
    want_last = run(model, (plain, 6))[3:]
    scale = float(want_first.abs().max())
    torch.testing.assert_close(edited[:3], want_first, atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(edited[3:], want_last, atol=1e-4 * scale, rtol=0)
    assert (want_first - run(model, (plain, 6))[:3]).abs().max() > 1e-2 * scale  # the LoRA shows
