"""RCCA on the joint-attention families (tiny random Flux.1-dev and SD3 / SD3.5 layouts, fp32 CPU,
real ComfyUI host): the RCCA Attention Patch node, the core KSampler, FluxGuidance."""

from __future__ import annotations

import pytest
import torch

FLUX, SD3 = "tiny_flux.safetensors", "tiny_sd3.safetensors"  # written by tests/conftest.py
SIZE = 64  # px: an 8 x 8 latent, 4 x 4 image tokens in 2 x 2 patches


def node(host, node_id):
    return host.nodes.NODE_CLASS_MAPPINGS[node_id]


def result(out):
    return out.result if hasattr(out, "result") else out


def halves(size=SIZE, batch=1):
    left = torch.zeros(batch, size, size)
    left[..., : size // 2] = 1
    return left, 1 - left


def palette_of(host, ckpt, regions, background="a sunny meadow", size=SIZE):
    _, clip, _ = host.load_checkpoint(ckpt)
    chain = None
    for prompt, mask, *strength in regions:
        chain = result(node(host, "RCCAAddRegion").execute(mask, prompt, strength[0] if strength else 1.0,
                                                           regions=chain))[0]
    return result(node(host, "RCCARegionalPromptPalette").execute(clip, background, size, size, chain))


def patch(host, model, palette, mode="soft", **kw):
    return result(node(host, "RCCAAttentionPatch").execute(model, palette, mode, kw.pop("start", 0.0),
                                                           kw.pop("end", 1.0), kw.pop("blocks", "all"), **kw))[0]


def positive_for(host, ckpt, cond):
    if ckpt == FLUX:
        return result(node(host, "FluxGuidance").execute(cond, 3.5))[0]
    return cond


def sample(host, model, positive, negative, cfg, latent=None, steps=2, seed=0, add_noise=True):
    latent = latent or {"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}
    return host.nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", seed, steps, cfg, "euler",
                                                "simple", positive, negative, latent, 0, steps, "disable")[0]["samples"]


def first_block(model):
    diffusion = model.model.diffusion_model
    return diffusion.double_blocks[0] if hasattr(diffusion, "double_blocks") else diffusion.joint_blocks[0]


def capture_first_block(model):
    """Outputs of the first joint block at every model call: (image tokens, text tokens of the cond rows)."""
    seen = []

    def hook(module, args, kwargs, out):
        img, txt = (out[1], out[0]) if hasattr(module, "context_block") else out  # SD3: (context, x); Flux: (img, txt)
        cond = [i for i, c in enumerate(kwargs["transformer_options"].get("cond_or_uncond", [0])) if c == 0]
        seen.append((img.detach().clone(), txt[cond].detach().clone()))  # text of the cond rows

    handle = first_block(model).register_forward_hook(hook, with_kwargs=True)
    return seen, handle


def cfg_for(ckpt):
    return 1.0 if ckpt == FLUX else 2.0


@pytest.mark.parametrize("ckpt", [FLUX, SD3])
def test_full_canvas_region_equals_plain_conditioning(comfy_host, ckpt):
    """One region over the whole canvas == plain conditioning with its prompt (pooled vector and
    Flux guidance from the background, as the patch documents), at the first block and after
    sampling; SD3 at cfg 2 (uncond rows keep their own context), Flux at cfg 1 with guidance."""
    model, clip, _ = comfy_host.load_checkpoint(ckpt)
    palette, background, _ = palette_of(comfy_host, ckpt, [("a red fox", torch.ones(1, SIZE, SIZE))])
    patched = patch(comfy_host, model, palette)
    fox = comfy_host.nodes.CLIPTextEncode().encode(clip, "a red fox")[0][0][0]
    plain = [[fox, dict(background[0][1])]]  # the background's pooled output with the fox's tokens
    negative = comfy_host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    cfg = cfg_for(ckpt)
    seen, handle = capture_first_block(model)
    try:
        got = sample(comfy_host, patched, positive_for(comfy_host, ckpt, background), negative, cfg)
        want = sample(comfy_host, model, positive_for(comfy_host, ckpt, plain), negative, cfg)
    finally:
        handle.remove()
    calls = len(seen) // 2
    img_patched, txt_patched = seen[0]
    img_plain, txt_plain = seen[calls]
    torch.testing.assert_close(img_patched, img_plain, atol=1e-5, rtol=0)
    own = background[0][0].shape[1]
    torch.testing.assert_close(txt_patched[:, own:own + fox.shape[1]], txt_plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, sample(comfy_host, model, positive_for(comfy_host, ckpt, background), negative,
                                           cfg), atol=1e-4)  # the fox's tokens matter


@pytest.mark.parametrize("ckpt", [FLUX, SD3])
def test_hard_disjoint_regions_isolate_the_first_block(comfy_host, ckpt):
    model, _, _ = comfy_host.load_checkpoint(ckpt)
    left, right = halves()
    outputs = []
    for other in ("a blue car", "a green dragon with wings"):
        palette, background, _ = palette_of(comfy_host, ckpt, [("a red fox", left), (other, right)])
        seen, handle = capture_first_block(model)
        try:
            sample(comfy_host, patch(comfy_host, model, palette, mode="hard"), positive_for(comfy_host, ckpt, background),
                   background, 1.0, steps=1)
        finally:
            handle.remove()
        own = background[0][0].shape[1]
        fox = slice(own, own + palette.regions[0].context.shape[1])
        img, txt = seen[0]
        outputs.append((img.reshape(1, 4, 4, -1), txt[:, fox]))
    (img_a, fox_a), (img_b, fox_b) = outputs
    torch.testing.assert_close(img_a[:, :, :2], img_b[:, :, :2], atol=1e-6, rtol=0)  # the fox's half
    assert not torch.allclose(img_a[:, :, 2:], img_b[:, :, 2:], atol=1e-4)
    torch.testing.assert_close(fox_a, fox_b, atol=1e-6, rtol=0)  # the fox's text tokens


@pytest.mark.parametrize("ckpt", [FLUX, SD3])
def test_soft_masses_at_every_joint_call_match_float64(comfy_host, ckpt):
    """An earlier attention override (another pack's) sees the final bias RCCA passes on; with the
    real q / k of every joint call, the prompts' masses follow the documented formula in float64."""
    model, _, _ = comfy_host.load_checkpoint(ckpt)
    ramp = torch.linspace(-0.5, 1.0, SIZE).clamp_min(0).expand(1, SIZE, SIZE).contiguous()
    palette, background, _ = palette_of(comfy_host, ckpt, [("a red fox", ramp * 0.8), ("a blue car", 1 - ramp, 0.5)])
    checked = []

    def recorder(func, q, k, v, heads, **kwargs):
        mask = kwargs.get("mask")
        if mask is not None and mask.ndim == 4:  # normalised: (B, heads, L, L)
            checked.append(check_masses(q, k, heads, mask, palette, kwargs))
        return func(q, k, v, heads, **kwargs)

    base = model.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    sample(comfy_host, patch(comfy_host, base, palette), positive_for(comfy_host, ckpt, background), background, 1.0,
           steps=1)
    assert len(checked) >= 2 and all(checked), checked


def check_masses(q, k, heads, bias, palette, kwargs) -> bool:
    if q.ndim == 3:
        b, length, inner = q.shape
        q, k = (t.reshape(b, length, heads, -1).transpose(1, 2) for t in (q, k))
    q, k, bias = q.double(), k.double(), bias.double()
    length = q.shape[2]
    image = 16
    text = length - image
    own = text - sum(r.context.shape[1] for r in palette.regions)
    counts = [own] + [r.context.shape[1] for r in palette.regions]
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    onehot = torch.nn.functional.one_hot(ids, len(counts)).double()
    raw = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    prob = torch.softmax(raw + bias, dim=-1)[:, :, text:]
    mass = prob[..., :text] @ onehot
    level = palette_weights(palette)  # (1, 3, 16): background, fox, car at the token grid
    weight = level.transpose(1, 2)[:, None].double()
    several = (weight > 1e-4).sum(-1) > 1
    share_ok = torch.allclose((mass / mass.sum(-1, keepdim=True))[several.expand(mass.shape[:-1])],
                              (weight / weight.sum(-1, keepdim=True)).expand_as(mass)[several.expand(mass.shape[:-1])],
                              atol=1e-5)
    z = raw[:, :, text:, :text].exp() @ onehot
    ratio = mass.sum(-1) / prob[..., text:].sum(-1)
    want = (weight * z).sum(-1) / weight.sum(-1) / raw[:, :, text:, text:].exp().sum(-1)
    sel = several.expand_as(ratio)
    return bool(share_ok and torch.allclose(ratio[sel], want[sel], rtol=1e-4))


def palette_weights(palette):
    import torch.nn.functional as F
    regions = F.interpolate(palette.region_coverage(), size=(4, 4), mode="area")
    return torch.cat([(1 - regions.sum(1, keepdim=True)).clamp(0, 1), regions], dim=1).flatten(2)


@pytest.mark.parametrize("ckpt", [FLUX, SD3])
def test_zero_coverage_batches_and_per_sample_masks(comfy_host, ckpt):
    """No NaN with an empty region and overlaps; a batch of 2 latents with their own masks equals
    each latent sampled alone with its mask (no added noise, so the start is the given latent)."""
    model, _, _ = comfy_host.load_checkpoint(ckpt)
    empty = torch.zeros(1, SIZE, SIZE)
    palette, background, _ = palette_of(comfy_host, ckpt, [("nothing yet", empty), ("a fox", torch.ones(1, SIZE, SIZE)),
                                                            ("a car", torch.ones(1, SIZE, SIZE), 0.6)])
    out = sample(comfy_host, patch(comfy_host, model, palette), positive_for(comfy_host, ckpt, background), background,
                 cfg_for(ckpt))
    assert torch.isfinite(out).all()

    left, right = halves()
    both = torch.cat([left, right])
    start = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    palette, background, _ = palette_of(comfy_host, ckpt, [("a red fox", both)])
    batch = sample(comfy_host, patch(comfy_host, model, palette), positive_for(comfy_host, ckpt, background), background,
                   cfg_for(ckpt), latent={"samples": start}, add_noise=False)
    for i, mask in enumerate((left, right)):
        palette, background, _ = palette_of(comfy_host, ckpt, [("a red fox", mask)])
        alone = sample(comfy_host, patch(comfy_host, model, palette), positive_for(comfy_host, ckpt, background),
                       background, cfg_for(ckpt), latent={"samples": start[i:i + 1]}, add_noise=False)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)


def test_flux_odd_latent_sizes_pad_to_whole_patches(comfy_host):
    model, _, _ = comfy_host.load_checkpoint(FLUX)
    width, height = 72, 56  # a 9 x 7 latent: 5 x 4 image tokens with padding
    left = torch.zeros(1, height, width)
    left[..., :36] = 1
    palette, background, _ = palette_of_size(comfy_host, [("a red fox", left), ("a blue car", 1 - left)], width, height)
    positive = positive_for(comfy_host, FLUX, background)
    latent = {"samples": torch.zeros(1, 16, height // 8, width // 8)}
    out = sample(comfy_host, patch(comfy_host, model, palette), positive, background, 1.0, latent=latent)
    plain = sample(comfy_host, model, positive, background, 1.0, latent=latent)
    assert out.shape == (1, 16, 7, 9) and torch.isfinite(out).all()
    assert not torch.allclose(out, plain, atol=1e-4)


def palette_of_size(host, regions, width, height):
    _, clip, _ = host.load_checkpoint(FLUX)
    chain = None
    for prompt, mask in regions:
        chain = result(node(host, "RCCAAddRegion").execute(mask, prompt, 1.0, regions=chain))[0]
    return result(node(host, "RCCARegionalPromptPalette").execute(clip, "a meadow", width, height, chain))


@pytest.mark.parametrize("ckpt", [FLUX, SD3])
def test_composes_with_another_packs_block_patch_and_refuses_a_bypass(comfy_host, ckpt):
    model, _, _ = comfy_host.load_checkpoint(ckpt)
    left, right = halves()
    palette, background, _ = palette_of(comfy_host, ckpt, [("a red fox", left), ("a blue car", right)])
    positive = positive_for(comfy_host, ckpt, background)
    want = sample(comfy_host, patch(comfy_host, model, palette), positive, background, 1.0)
    calls = []

    def block_patch(args, extra):  # a pack that wraps joint block 0 and runs the original
        calls.append(1)
        return extra["original_block"](args)

    other = model.clone()
    other.set_model_patch_replace(block_patch, "dit", "double_block", 0)
    got = sample(comfy_host, patch(comfy_host, other, palette), positive, background, 1.0)
    assert calls
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    def bypass(func, *args, **kwargs):  # an override set after RCCA that does not chain
        return func(*args, **kwargs)

    patched = patch(comfy_host, model, palette).clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = bypass
    with pytest.raises(Exception, match="no attention call of this model reached RCCA"):
        sample(comfy_host, patched, positive, background, 1.0)


def test_wrong_family_palette_and_options_are_refused(comfy_host):
    flux, _, _ = comfy_host.load_checkpoint(FLUX)
    sd3_palette, _, _ = palette_of(comfy_host, SD3, [("a red fox", halves()[0])])
    with pytest.raises(ValueError, match="encoded with the SD3 / SD3.5 text encoders but this model is Flux.1"):
        patch(comfy_host, flux, sd3_palette)
    _, sd15_clip, _ = comfy_host.load_tiny()
    regions = result(node(comfy_host, "RCCAAddRegion").execute(halves()[0], "a fox", 1.0))[0]
    sd15_palette = result(node(comfy_host, "RCCARegionalPromptPalette").execute(sd15_clip, "bg", SIZE, SIZE, regions))[0]
    with pytest.raises(ValueError, match="encoded with the SD1.5 text encoders but this model is Flux.1"):
        patch(comfy_host, flux, sd15_palette)
    sd15, _, _ = comfy_host.load_tiny()
    with pytest.raises(ValueError, match="encoded with the SD3 / SD3.5 text encoders but this model is SD1.5"):
        patch(comfy_host, sd15, sd3_palette)
    flux_palette, _, _ = palette_of(comfy_host, FLUX, [("a red fox", halves()[0])])
    with pytest.raises(ValueError, match="blocks must be 'all'"):
        patch(comfy_host, flux, flux_palette, blocks="input")
    with pytest.raises(ValueError, match="self_attention_until applies to SD1.5 / SDXL"):
        patch(comfy_host, flux, flux_palette, self_attention_until=0.3)
    once = patch(comfy_host, flux, flux_palette)
    with pytest.raises(ValueError, match="already carries an RCCA Attention Patch"):
        patch(comfy_host, once, flux_palette)
    assert "optimized_attention_override" not in flux.model_options.get("transformer_options", {})  # input untouched


def test_region_text_option_and_sigma_range_on_flux(comfy_host):
    model, _, _ = comfy_host.load_checkpoint(FLUX)
    left, right = halves()
    palette, background, _ = palette_of(comfy_host, FLUX, [("a red fox", left), ("a blue car", right)])
    positive = positive_for(comfy_host, FLUX, background)
    own = sample(comfy_host, patch(comfy_host, model, palette), positive, background, 1.0)
    whole = sample(comfy_host, patch(comfy_host, model, palette, region_text="whole image"), positive, background, 1.0)
    assert not torch.allclose(own, whole, atol=1e-5)
    plain = sample(comfy_host, model, positive, background, 1.0)
    off = sample(comfy_host, patch(comfy_host, model, palette, start=0.9, end=1.0), positive, background, 1.0)
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=0)  # outside its range RCCA is the background alone
