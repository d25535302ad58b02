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


def plain_lcm(host, model, positive, negative, cfg, seed, frame, sigmas, steps):
    """ComfyUI's own LCM sampler on one frame, fed the stream's per-frame noise."""
    import comfy.k_diffusion.sampling as kd
    import comfy.sample
    import comfy.samplers

    draws = host.pack_module("rcca_core.stream").frame_noise(seed, frame, steps, (4, SIZE // 8, SIZE // 8))
    queue = list(draws[1:])
    sampler = comfy.samplers.KSAMPLER(kd.sample_lcm, extra_options={"noise_sampler": lambda s, sn: queue.pop(0).unsqueeze(0)})
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    return comfy.sample.sample_custom(model, draws[:1], cfg, sampler, torch.tensor(sigmas + [0.0]), positive, negative,
                                      latent, seed=seed)


def sigmas_of(host, model):
    return host.pack_module("nodes.stream_runtime").stream_sigmas(model, TIMESTEPS, 50)[0]


@pytest.mark.parametrize("cfg_mode", ["none", "full"])
def test_rcca_stream_frames_equal_plain_lcm_of_each_frame(comfy_host, cfg_mode):
    model = comfy_host.load_tiny()[0]
    left, right = halves()
    pal_a, background, _ = palette(comfy_host, ["a red fox", "a blue car"], [left, right])
    pal_b, _, _ = palette(comfy_host, ["a green frog", "a blue car"], [right, left])
    timeline = timeline_of(comfy_host, (pal_a, 2), (pal_b, 3))
    cfg = 2.0 if cfg_mode == "full" else 1.0
    frames, images = stream(comfy_host, 5, seed=11, cfg_mode=cfg_mode, cfg=cfg, timeline=timeline, positive=background)
    assert frames["samples"].shape == (5, 4, SIZE // 8, SIZE // 8) and images.shape == (5, SIZE, SIZE, 3)
    sigmas = sigmas_of(comfy_host, model)
    for f, pal in enumerate([pal_a, pal_a, pal_b, pal_b, pal_b]):
        patched = node(comfy_host, "RCCAAttentionPatch").execute(model, pal, "soft", 0.0, 1.0, "all").result[0]
        want = plain_lcm(comfy_host, patched, background, encode(comfy_host, "blurry"), cfg, 11, f, sigmas, 4)
        assert_frames_close(frames["samples"][f:f + 1], want)
    assert (frames["samples"][1] - frames["samples"][2]).abs().max() > 1e-3


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
])
def test_bad_stream_input_is_refused(comfy_host, kw, message):
    pal, background, _ = palette(comfy_host, ["a red fox"], [halves()[0]])
    frames = kw.pop("frames", 3)
    states = kw.pop("states", None)
    timeline = timeline_of(comfy_host, (pal, states)) if states else None
    if kw.pop("no_palette", False):
        pal = None
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
