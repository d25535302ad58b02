"""Stream Batch LCM Sampler on the real host: frames equal plain LCM sampling of each frame alone."""

import pytest
import torch

SIZE = 128
TIMESTEPS = "0, 12, 24, 36"


def assert_frames_close(got, want):
    """Equal up to float32 rounding: random weights give latents of magnitude ~400, and a batch of
    4 slots rounds differently from a batch of 1, so the bound is relative to the frame's scale."""
    torch.testing.assert_close(got, want, atol=2e-6 * float(want.abs().max()), rtol=0)


def node(host, node_id):
    return host.nodes.NODE_CLASS_MAPPINGS[node_id]


def halves(size=SIZE, left_first=True):
    left = torch.zeros(1, size, size)
    left[..., : size // 2] = 1
    return (left, 1 - left) if left_first else (1 - left, left)


def palette(host, prompts, masks, background="a meadow"):
    _, clip, _ = host.load_tiny()
    regions = None
    for prompt, mask in zip(prompts, masks):
        regions = node(host, "RCCAAddRegion").execute(mask, prompt, 1.0, regions=regions).result[0]
    return node(host, "RCCARegionalPromptPalette").execute(clip, background, SIZE, SIZE, regions).result


def encode(host, text):
    _, clip, _ = host.load_tiny()
    return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def stream(host, frames, seed=11, region_mode="rcca", cfg_mode="none", cfg=1.5, pal=None, timeline=None,
           positive=None, timesteps=TIMESTEPS, model=None, **kw):
    model = model or host.load_tiny()[0]
    latent = host.nodes.EmptyLatentImage().generate(SIZE, SIZE, frames)[0]
    positive = positive or encode(host, "a meadow")
    return node(host, "RCCAStreamBatchLCMSampler").execute(
        model, positive, encode(host, "blurry"), latent, timesteps, 50, seed, region_mode, cfg_mode, cfg, "eager",
        kw.pop("decode", "latent2rgb"), palette=pal, timeline=timeline, **kw).result


def timeline_of(host, *states):
    tl = None
    for pal, frames in states:
        tl = node(host, "RCCAPaletteTimeline").execute(pal, frames, timeline=tl).result[0]
    return tl


def plain_lcm(host, model, positive, negative, cfg, seed, frame, sigmas, steps, latent=None, noise_mask=None):
    """ComfyUI's own LCM sampler on one frame (SamplerCustom's path: sample_custom), fed the
    stream's per-frame noise; image-to-image with a LATENT `latent`, inpaint with a `noise_mask`."""
    import comfy.k_diffusion.sampling as kd
    import comfy.sample
    import comfy.samplers

    draws = host.pack_module("rcca_core.stream").frame_noise(seed, frame, steps, (4, SIZE // 8, SIZE // 8))
    queue = list(draws[1:])
    sampler = comfy.samplers.KSAMPLER(kd.sample_lcm, extra_options={"noise_sampler": lambda s, sn: queue.pop(0).unsqueeze(0)})
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8) if latent is None else latent
    return comfy.sample.sample_custom(model, draws[:1], cfg, sampler, torch.tensor(sigmas + [0.0]), positive, negative,
                                      latent, noise_mask=noise_mask, seed=seed)


def sigmas_of(host, model, strength=None):
    return host.pack_module("nodes.stream_runtime").stream_sigmas(model, TIMESTEPS, 50, strength)[0]


@pytest.mark.parametrize("cfg_mode, noise", [("none", "per_frame"), ("full", "per_frame"), ("none", "fixed")])
def test_rcca_stream_frames_equal_plain_lcm_of_each_frame(comfy_host, cfg_mode, noise):
    model = comfy_host.load_tiny()[0]
    left, right = halves()
    pal_a, background, _ = palette(comfy_host, ["a red fox", "a blue car"], [left, right])
    pal_b, _, _ = palette(comfy_host, ["a green frog", "a blue car"], [right, left])
    timeline = timeline_of(comfy_host, (pal_a, 2), (pal_b, 3))
    cfg = 2.0 if cfg_mode == "full" else 1.0
    frames, images = stream(comfy_host, 5, seed=11, cfg_mode=cfg_mode, cfg=cfg, timeline=timeline, positive=background,
                            noise=noise)
    assert frames["samples"].shape == (5, 4, SIZE // 8, SIZE // 8) and images.shape == (5, SIZE, SIZE, 3)
    sigmas = sigmas_of(comfy_host, model)
    for f, pal in enumerate([pal_a, pal_a, pal_b, pal_b, pal_b]):
        patched = node(comfy_host, "RCCAAttentionPatch").execute(model, pal, "soft", 0.0, 1.0, "all").result[0]
        noise_of = 0 if noise == "fixed" else f  # fixed: every frame gets frame 0's draws
        want = plain_lcm(comfy_host, patched, background, encode(comfy_host, "blurry"), cfg, 11, noise_of, sigmas, 4)
        assert_frames_close(frames["samples"][f:f + 1], want)
    assert (frames["samples"][1] - frames["samples"][2]).abs().max() > 1e-3


def test_fixed_noise_gives_identical_frames_for_an_unchanged_palette_and_per_frame_does_not(comfy_host):
    left, right = halves()
    pal, background, _ = palette(comfy_host, ["a red fox", "a blue car"], [left, right])
    fixed, _ = stream(comfy_host, 6, seed=3, pal=pal, positive=background, noise="fixed")
    per_frame, _ = stream(comfy_host, 6, seed=3, pal=pal, positive=background, noise="per_frame")
    for f in range(1, 6):
        assert_frames_close(fixed["samples"][f], fixed["samples"][0])
        assert (per_frame["samples"][f] - per_frame["samples"][0]).abs().max() > 1e-2 * float(per_frame["samples"].abs().max())
    assert_frames_close(fixed["samples"][0], per_frame["samples"][0])  # frame 0: the same draws in both modes


def photo(seed=0, frames=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, SIZE, SIZE, 3, generator=g)


def inpaint_mask():
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, : SIZE // 2, :] = 1.0  # repaint the top half
    mask[:, SIZE // 2: SIZE // 2 + 8, : SIZE // 4] = 0.5
    return mask


@pytest.mark.parametrize("region_mode, noise, inpaint", [
    ("rcca", "per_frame", False), ("rcca", "fixed", True), ("none", "fixed", False), ("none", "per_frame", True)])
def test_image_to_image_frames_equal_plain_lcm_image_to_image(comfy_host, region_mode, noise, inpaint):
    """A frame = SamplerCustom with the lcm sampler on that frame alone: the image's latent, the sigmas
    strength keeps, the frame's noise, and for inpaint the mask as the latent's noise mask."""
    model, _, vae = comfy_host.load_tiny()
    left, right = halves()
    pal, background, _ = palette(comfy_host, ["a red fox", "a blue car"], [left, right])
    image, mask = photo(), inpaint_mask() if inpaint else None
    frames, _ = stream(comfy_host, 3, seed=13, region_mode=region_mode, pal=pal if region_mode == "rcca" else None,
                       positive=background, noise=noise, vae=vae, image=image, strength=0.6, mask=mask)
    sigmas = sigmas_of(comfy_host, model, 0.6)
    assert len(sigmas) == 2  # 0.6 keeps t = 519 and 279 of 999, 759, 519, 279
    sampled = node(comfy_host, "RCCAAttentionPatch").execute(model, pal, "soft", 0.0, 1.0, "all").result[0] \
        if region_mode == "rcca" else model
    latent = vae.encode(image)
    for f in range(3):
        want = plain_lcm(comfy_host, sampled, background, encode(comfy_host, "blurry"), 1.0, 13,
                         0 if noise == "fixed" else f, sigmas, 2, latent=latent, noise_mask=mask)
        assert_frames_close(frames["samples"][f:f + 1], want)
    text2img, _ = stream(comfy_host, 1, seed=13, region_mode=region_mode, pal=pal if region_mode == "rcca" else None,
                         positive=background, vae=vae)
    assert (frames["samples"][0] - text2img["samples"][0]).abs().max() > 1e-2 * float(text2img["samples"].abs().max())
    if inpaint:  # latent pixels the mask leaves alone (0 after ComfyUI's bilinear resize) are the photo's
        import comfy.sampler_helpers

        keep = comfy.sampler_helpers.prepare_mask(mask, (1, 4, SIZE // 8, SIZE // 8), "cpu")[0] == 0
        torch.testing.assert_close(frames["samples"][0][keep], latent[0][keep], atol=1e-5, rtol=1e-5)


def test_one_image_per_frame(comfy_host):
    model, _, vae = comfy_host.load_tiny()
    images = photo(1, frames=2)
    both, _ = stream(comfy_host, 2, seed=2, region_mode="none", vae=vae, image=images, strength=0.8)
    for f in range(2):
        alone, _ = stream(comfy_host, 1, seed=2 + f, region_mode="none", vae=vae, image=images[f:f + 1], strength=0.8)
        assert_frames_close(both["samples"][f:f + 1], alone["samples"])



def test_no_region_stream_equals_plain_lcm(comfy_host):
    model = comfy_host.load_tiny()[0]
    frames, _ = stream(comfy_host, 3, seed=5, region_mode="none", positive=encode(comfy_host, "a castle"))
    sigmas = sigmas_of(comfy_host, model)
    for f in range(3):
        want = plain_lcm(comfy_host, model, encode(comfy_host, "a castle"), encode(comfy_host, "blurry"), 1.0, 5, f, sigmas, 4)
        assert_frames_close(frames["samples"][f:f + 1], want)


def test_edit_reaches_only_frames_entering_after_it(comfy_host):
    left, right = halves()
    pal_a, background, _ = palette(comfy_host, ["a red fox"], [left])
    pal_b, _, _ = palette(comfy_host, ["a white boat"], [right])
    edited, _ = stream(comfy_host, 6, timeline=timeline_of(comfy_host, (pal_a, 3), (pal_b, 3)), positive=background)
    only_a, _ = stream(comfy_host, 6, timeline=timeline_of(comfy_host, (pal_a, 6)), positive=background)
    only_b, _ = stream(comfy_host, 6, timeline=timeline_of(comfy_host, (pal_b, 6)), positive=background)
    assert_frames_close(edited["samples"][:3], only_a["samples"][:3])
    assert_frames_close(edited["samples"][3:], only_b["samples"][3:])


def test_semantic_draw_stream_equals_its_frames_sampled_alone(comfy_host):
    left, right = halves()
    pal, background, _ = palette(comfy_host, ["a red fox", "a blue car"], [left, right])
    together, _ = stream(comfy_host, 3, seed=21, region_mode="semantic_draw", pal=pal, positive=background,
                         timesteps="0, 4, 12, 25, 37")
    for f in range(3):
        alone, _ = stream(comfy_host, 1, seed=21 + f, region_mode="semantic_draw", pal=pal, positive=background,
                          timesteps="0, 4, 12, 25, 37")
        assert_frames_close(together["samples"][f:f + 1], alone["samples"])
    rcca, _ = stream(comfy_host, 1, seed=21, pal=pal, positive=background, timesteps="0, 4, 12, 25, 37")
    assert (rcca["samples"][0] - together["samples"][0]).abs().max() > 1e-3  # a different region mode


def test_mask_batch_palette_gives_one_state_per_frame_and_the_last_holds(comfy_host):
    left, right = halves()
    batch_mask = torch.cat([left, right])  # frame 0: left, frame 1 (and after): right
    pal, background, _ = palette(comfy_host, ["a red fox"], [batch_mask])
    pal_left, _, _ = palette(comfy_host, ["a red fox"], [left])
    pal_right, _, _ = palette(comfy_host, ["a red fox"], [right])
    got, _ = stream(comfy_host, 3, pal=pal, positive=background)
    want = stream(comfy_host, 3, timeline=timeline_of(comfy_host, (pal_left, 1), (pal_right, 2)), positive=background)[0]
    assert_frames_close(got["samples"], want["samples"])


def test_decode_with_a_vae(comfy_host):
    _, _, vae = comfy_host.load_tiny()
    pal, background, _ = palette(comfy_host, ["a red fox"], [halves()[0]])
    frames, images = stream(comfy_host, 2, pal=pal, positive=background, vae=vae, decode="vae")
    torch.testing.assert_close(images, vae.decode(frames["samples"]))


@pytest.mark.parametrize("kw, message", [
    ({"timesteps": ""}, "the timestep list is empty"),
    ({"timesteps": "0, 12, 60"}, r"\[60\] are outside the 50-step schedule"),
    ({"timesteps": "24, 12, 0"}, "increase strictly"),
    ({"frames": 2, "states": 3}, "3 palette states but the latent batch asks for 2 frames"),
    ({"region_mode": "rcca", "no_palette": True}, "needs a palette or a timeline"),
    ({"decode": "vae"}, "no VAE is connected"),
    ({"image": "photo"}, "image-to-image encodes the image with the VAE, but no VAE is connected"),
    ({"mask": "mask"}, "a mask says which pixels of an image to repaint, but no image is connected"),
    ({"image": "small", "vae": True}, r"the image is 64 x 64 px but the frames are 128 x 128 px; scale or crop"),
    ({"image": "photo", "mask": "small", "vae": True}, r"the mask is 64 x 64 px but the image is 128 x 128 px"),
    ({"image": "two", "vae": True}, r"the image batch has 2 images; give 1 \(every frame\) or 3 \(one per frame\)"),
    ({"image": "photo", "mask": "over", "vae": True}, r"mask values must be in \[0, 1\]"),
    ({"image": "photo", "vae": True, "strength": 0.2}, r"strength 0.2 keeps none of the timesteps \[999, 759, 519, 279\]"),
    ({"image": "photo", "vae": True, "strength": 1.5}, r"strength must be a number in \(0, 1\].*got 1.5"),
    ({"strength": 0.0}, r"strength must be a number in \(0, 1\]"),
    ({"noise": "same"}, "noise must be one of per_frame, fixed, got 'same'"),
])
def test_bad_stream_input_is_refused(comfy_host, kw, message):
    pal, background, _ = palette(comfy_host, ["a red fox"], [halves()[0]])
    frames = kw.pop("frames", 3)
    states = kw.pop("states", None)
    timeline = timeline_of(comfy_host, (pal, states)) if states else None
    if kw.pop("no_palette", False):
        pal = None
    images = {"photo": photo(), "small": torch.rand(1, 64, 64, 3), "two": photo(frames=2)}
    masks = {"mask": inpaint_mask(), "small": torch.ones(1, 64, 64), "over": inpaint_mask() * 2}
    if "image" in kw:
        kw["image"] = images[kw["image"]]
    if "mask" in kw:
        kw["mask"] = masks[kw["mask"]]
    if kw.get("vae"):
        kw["vae"] = comfy_host.load_tiny()[2]
    with pytest.raises(ValueError, match=message):
        stream(comfy_host, frames, pal=None if timeline else pal, timeline=timeline, positive=background, **kw)


def test_latent_of_another_shape_is_refused(comfy_host):
    model = comfy_host.load_tiny()[0]
    pal, background, _ = palette(comfy_host, ["a red fox"], [halves()[0]])
    wide = comfy_host.nodes.EmptyLatentImage().generate(SIZE * 2, SIZE, 2)[0]
    sampler = node(comfy_host, "RCCAStreamBatchLCMSampler")
    with pytest.raises(ValueError, match=r"Stream Batch LCM Sampler: the latent \(256 x 128 px\) does not have the "
                                         r"palette canvas's aspect ratio \(128 x 128 px\)"):
        sampler.execute(model, background, background, wide, TIMESTEPS, 50, 0, "rcca", "none", 1.0, "eager", "auto", palette=pal)
    import types

    import comfy.supported_models as sm

    flux = types.SimpleNamespace(model=types.SimpleNamespace(model_config=object.__new__(sm.Flux)))
    with pytest.raises(ValueError, match="^Stream Batch LCM Sampler supports SD1.5 .* this model is Flux"):
        sampler.execute(flux, background, background, wide, TIMESTEPS, 50, 0, "rcca", "none", 1.0, "eager", "auto", palette=pal)
    sixteen = {"samples": torch.zeros(2, 16, SIZE // 8, SIZE // 8)}
    with pytest.raises(ValueError, match="16 channels but this model uses 4"):
        sampler.execute(model, background, background, sixteen, TIMESTEPS, 50, 0, "rcca", "none", 1.0, "eager", "auto", palette=pal)
