"""The pack's nodes on a real in-process ComfyUI with the core KSampler (tiny random SD1.5)."""

import types

import pytest
import torch

SIZE = 256


def node(host, node_id):
    return host.nodes.NODE_CLASS_MAPPINGS[node_id]


def halves(size=SIZE):
    left = torch.zeros(1, size, size)
    left[..., : size // 2] = 1
    return left, 1 - left


def build_palette(host, prompts_and_masks, background="a meadow", mode="soft", **palette_kw):
    _, clip, _ = host.load_tiny()
    regions = None
    for prompt, mask, *rest in prompts_and_masks:
        kw = rest[0] if rest else {}
        regions = node(host, "RCCAAddRegion").execute(mask, prompt, kw.get("strength", 1.0), regions=regions,
                                                     negative=kw.get("negative", "")).result[0]
    width = palette_kw.get("width", SIZE)
    height = palette_kw.get("height", SIZE)
    return node(host, "RCCARegionalPromptPalette").execute(clip, background, width, height, regions).result


def patch(host, model, palette, mode="soft", start=0.0, end=1.0, blocks="all", pyramid=None):
    return node(host, "RCCAAttentionPatch").execute(model, palette, mode, start, end, blocks, pyramid=pyramid).result[0]


def encode(host, text):
    _, clip, _ = host.load_tiny()
    return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def sample(host, model, positive, negative, cfg=2.0, sampler="lcm", steps=4, seed=7, width=SIZE, height=SIZE, batch=1):
    latent = host.nodes.EmptyLatentImage().generate(width, height, batch)[0]
    scheduler = "sgm_uniform" if sampler == "lcm" else "normal"
    return host.nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]["samples"]


def test_pack_nodes_are_registered_with_display_names(comfy_host):
    import nodes
    assert comfy_host.pack_loaded
    names = {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in nodes.NODE_CLASS_MAPPINGS if k.startswith(("RCCA", "RCD"))}
    assert names == {"RCCARegionalPromptPalette": "Regional Prompt Palette", "RCCAAddRegion": "Add Region",
                     "RCCARegionLoRA": "Region LoRA",
                     "RCCAMaskPyramid": "Mask Pyramid", "RCCAAttentionPatch": "RCCA Attention Patch",
                     "RCCAStreamBatchLCMSampler": "Stream Batch LCM Sampler", "RCCAPaletteTimeline": "Palette Timeline",
                     "RCCASemanticDrawOptions": "SemanticDraw Options", "RCCALiveStream": "Live Stream",
                     "RCDEmbeddingRefiner": "RCD Embedding Refiner", "RCDLatentOptimizer": "RCD Latent Optimizer"}


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_one_full_canvas_region_equals_plain_sampling(comfy_host, cfg):
    model, _, _ = comfy_host.load_tiny()
    palette, background, _ = build_palette(comfy_host, [("a red fox in the snow", torch.ones(1, SIZE, SIZE))])
    negative = encode(comfy_host, "blurry")
    got = sample(comfy_host, patch(comfy_host, model, palette), background, negative, cfg=cfg)
    want = sample(comfy_host, model, encode(comfy_host, "a red fox in the snow"), negative, cfg=cfg)
    assert (got - sample(comfy_host, model, background, negative, cfg=cfg)).abs().max() > 1e-3  # the region mattered
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hard_disjoint_regions_leave_the_other_region_unchanged_at_the_layer_output(comfy_host):
    model, _, _ = comfy_host.load_tiny()
    left, right = halves()
    outputs = []
    for right_prompt in ("a blue car", "a tall lighthouse at night"):
        palette, background, _ = build_palette(comfy_host, [("a red fox", left), (right_prompt, right)])
        patched = patch(comfy_host, model, palette, mode="hard").clone()
        captured = []

        def capture(n, extra):
            if extra["block"] == ("input", 1) and not captured:
                captured.append(n.clone())
            return n

        patched.set_model_attn2_output_patch(capture)
        sample(comfy_host, patched, background, encode(comfy_host, ""), cfg=1.0, steps=1)
        outputs.append(captured[0].reshape(1, SIZE // 8, SIZE // 8, -1))
    half = SIZE // 16
    torch.testing.assert_close(outputs[0][:, :, :half], outputs[1][:, :, :half], atol=1e-6, rtol=0)
    assert (outputs[0][:, :, half:] - outputs[1][:, :, half:]).abs().max() > 1e-4


def test_batch_of_two_on_a_non_square_odd_latent_samples_finite(comfy_host):
    model, _, _ = comfy_host.load_tiny()
    w, h = 200, 136  # latent 25 x 17: odd on both axes, levels round up
    left = torch.zeros(1, h, w)
    left[..., : w // 2] = 1
    palette, background, _ = build_palette(comfy_host, [("a red fox", left), ("a blue car", 1 - left, {"strength": 0.6})],
                                           width=w, height=h)
    patched = patch(comfy_host, model, palette)
    out = sample(comfy_host, patched, background, encode(comfy_host, "blurry"), width=w, height=h, batch=2)
    assert out.shape == (2, 4, 17, 25) and torch.isfinite(out).all()


def test_patch_leaves_the_input_model_untouched(comfy_host):
    model, _, _ = comfy_host.load_tiny()
    positive, negative = encode(comfy_host, "a castle"), encode(comfy_host, "")
    before = sample(comfy_host, model, positive, negative)
    options_before = repr(model.model_options)
    left, right = halves()
    palette, background, _ = build_palette(comfy_host, [("a red fox", left), ("a blue car", right)])
    patched = patch(comfy_host, model, palette)
    assert patched is not model and patched.model is model.model  # a clone sharing weights
    sample(comfy_host, patched, background, negative)
    assert repr(model.model_options) == options_before
    torch.testing.assert_close(sample(comfy_host, model, positive, negative), before, atol=0, rtol=0)


def test_mask_pyramid_node_matches_lazy_levels(comfy_host):
    model, _, _ = comfy_host.load_tiny()
    left, right = halves()
    palette, background, _ = build_palette(comfy_host, [("a red fox", left), ("a blue car", right, {"strength": 0.5})])
    latent = comfy_host.nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    pyramid = node(comfy_host, "RCCAMaskPyramid").execute(palette, "area", latent=latent, levels=2).result[0]
    assert pyramid.sizes == [(32, 32), (16, 16)]
    negative = encode(comfy_host, "")
    with_pyramid = sample(comfy_host, patch(comfy_host, model, palette, pyramid=pyramid), background, negative)
    lazy = sample(comfy_host, patch(comfy_host, model, palette), background, negative)
    torch.testing.assert_close(with_pyramid, lazy, atol=0, rtol=0)


def graph(prompt_a, prompt_b, seed=3, ckpt="tiny_sd15.safetensors"):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE // 2, "height": SIZE}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 0], "source": ["3", 0], "x": 0, "y": 0, "operation": "add"}},
        "5": {"class_type": "InvertMask", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "RCCAAddRegion", "inputs": {"mask": ["4", 0], "prompt": prompt_a, "strength": 1.0}},
        "7": {"class_type": "RCCAAddRegion", "inputs": {"mask": ["5", 0], "prompt": prompt_b, "strength": 1.0, "regions": ["6", 0]}},
        "8": {"class_type": "RCCARegionalPromptPalette", "inputs": {"clip": ["1", 1], "background": "a meadow", "width": SIZE, "height": SIZE, "regions": ["7", 0]}},
        "9": {"class_type": "RCCAAttentionPatch", "inputs": {"model": ["1", 0], "palette": ["8", 0], "mode": "soft", "start_percent": 0.0, "end_percent": 1.0, "blocks": "all"}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["9", 0], "seed": seed, "steps": 4, "cfg": 1.5, "sampler_name": "lcm", "scheduler": "sgm_uniform",
                                                   "positive": ["8", 1], "negative": ["11", 0], "latent_image": ["10", 0], "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
    }


def test_graphs_queued_one_after_another_are_independent(comfy_host):
    def run(a, b):
        comfy_host.run_graph(graph(a, b))
        return comfy_host.node_output("12")[0]["samples"].clone()

    first = run("a red fox", "a blue car")
    other = run("a green frog", "a yellow boat")
    again = run("a red fox", "a blue car")
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert (other - first).abs().max() > 1e-3


def test_errors_are_clear_and_raised_before_sampling(comfy_host):
    g = graph("a red fox", "")
    with pytest.raises(AssertionError, match="prompt is empty") as err:
        comfy_host.run_graph(g)
    assert "(RCCAAddRegion)" in str(err.value) and "(KSampler)" not in str(err.value)  # refused before sampling

    g = graph("a red fox", "a blue car")
    g["3"]["inputs"].update(width=100, height=300)  # a mask larger than the canvas
    g["4"]["inputs"]["destination"] = ["3", 0]
    with pytest.raises(AssertionError, match=r"mask is 100 x 300 but the canvas is 256 x 256"):
        comfy_host.run_graph(g)

    g = graph("a red fox", "a blue car")
    g["8"]["inputs"].pop("regions")
    with pytest.raises(AssertionError, match="the palette is empty"):
        comfy_host.run_graph(g)

    g = graph("a red fox", "a blue car")
    g["10"]["inputs"].update(width=SIZE * 2)  # latent of another aspect ratio than the canvas
    with pytest.raises(AssertionError, match="aspect ratio"):
        comfy_host.run_graph(g)


def test_bad_masks_and_models_are_refused(comfy_host):
    import comfy.supported_models as sm

    add = node(comfy_host, "RCCAAddRegion")
    with pytest.raises(ValueError, match="NaN or infinite"):
        add.execute(torch.full((1, SIZE, SIZE), float("nan")), "a red fox", 1.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got min 0 and max 2"):
        add.execute(torch.linspace(0, 2, SIZE * SIZE).reshape(1, SIZE, SIZE), "a red fox", 1.0)

    palette, _, _ = build_palette(comfy_host, [("a red fox", torch.ones(1, SIZE, SIZE))])

    def fake_model(config):
        return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config))

    for unsupported in (sm.HiDream, sm.Flux2):
        with pytest.raises(ValueError, match=r"supports SD1.5 .*, SDXL, SD3 / SD3.5 and Flux.1 \(dev, schnell, fill\) "
                                             f"models; this model is {unsupported.__name__}"):
            patch(comfy_host, fake_model(object.__new__(unsupported)), palette)
    sd15 = object.__new__(sm.SD15)
    sd15.unet_config = {"context_dim": 768}
    with pytest.raises(ValueError, match="64-wide token embeddings but this model expects 768"):
        patch(comfy_host, fake_model(sd15), palette)
    model, _, _ = comfy_host.load_tiny()
    with pytest.raises(ValueError, match="cannot read 'encoder'"):
        patch(comfy_host, model, palette, blocks="encoder")


def test_drawn_regions_state_joins_the_palette_before_chained_regions(comfy_host):
    state_mod = comfy_host.pack_module("rcca_core.palette_state")
    palette_mod = comfy_host.pack_module("rcca_core.palette")
    left, right = halves()
    drawn = state_mod.encode_state([palette_mod.RegionSpec("a red fox", left[0], strength=0.5, name="fox", color="#e6194b")],
                                   SIZE, SIZE)
    _, clip, _ = comfy_host.load_tiny()
    chain = node(comfy_host, "RCCAAddRegion").execute(right, "a blue car", 1.0).result[0]
    palette, _, coverage = node(comfy_host, "RCCARegionalPromptPalette").execute(
        clip, "a meadow", SIZE, SIZE, chain, regions_state=drawn).result
    assert [r.spec.prompt for r in palette.regions] == ["a red fox", "a blue car"]
    assert [r.spec.name for r in palette.regions] == ["fox", "region 1"]  # each keeps the label its node gave
    torch.testing.assert_close(coverage[1], left[0] * 0.5, atol=1 / 255, rtol=0)
    with pytest.raises(ValueError, match="regions_state is not valid JSON"):
        node(comfy_host, "RCCARegionalPromptPalette").execute(clip, "a meadow", SIZE, SIZE, chain, regions_state="{")


def unet_call(host, model, rcca_palette=None, dtype=torch.float32, mode="soft", size=32, seed=3):
    """One forward of the tiny SD1.5 UNet (a private copy in `dtype`) with cond + uncond rows, through
    RCCA's hooks when a palette is given: ComfyUI's own transformer and attention code."""
    import copy

    core = host.pack_module("rcca_core.attention")
    dm = copy.deepcopy(model.get_model_object("diffusion_model")).to(dtype)
    options = {"transformer_options": {}}
    if rcca_palette is not None:
        rcca = core.RegionalCrossAttention(rcca_palette, core.cross_attention_layers(dm), core.RCCAOptions(mode=mode))
        rcca.install(options)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.cat([encode(host, "a meadow")[0][0], encode(host, "blurry")[0][0]])
    to = {**options["transformer_options"], "cond_or_uncond": [1, 0], "uuids": ["u", "c"],
          "sigmas": torch.tensor([3.0, 3.0])}
    with torch.no_grad():
        return dm(x.to(dtype), torch.tensor([500.0, 500.0]), context=ctx.to(dtype), transformer_options=to)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_bf16_unet_through_the_patch_matches_float32(comfy_host, mode):
    """The tiny SD1.5 UNet in bf16 on the CPU (ComfyUI's attention and ops) with RCCA: finite, and
    within bf16 rounding of the same weights in float32: at most 3 % of the output's range and no
    more than twice what bf16 costs the unpatched model (measured: 1.2 % patched, 1.5 % unpatched)."""
    model, _, _ = comfy_host.load_tiny()
    left, right = halves()
    car = right * 0.6
    car[..., SIZE // 2:, :] *= 0.5  # 0.3, below hard mode's 0.5: those pixels fall back to the background
    palette, _, _ = build_palette(comfy_host, [("a red fox", left * 0.7), ("a blue car", car)])
    rounded = copy_rounded(model)
    got = unet_call(comfy_host, rounded, palette, torch.bfloat16, mode)
    want = unet_call(comfy_host, rounded, palette, torch.float32, mode)
    plain_low = unet_call(comfy_host, rounded, None, torch.bfloat16)
    plain_ref = unet_call(comfy_host, rounded, None, torch.float32)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    scale = float(want.abs().max())
    err = float((got.float() - want).abs().max())
    assert err <= 3e-2 * scale
    assert err <= 2.0 * float((plain_low.float() - plain_ref).abs().max()) + 1e-3 * scale  # no worse than bf16 itself
    assert float((want - plain_ref).abs().max()) > 5 * err  # the regions changed the output well beyond rounding (measured: 11 x)


def copy_rounded(model):
    """A stand-in ModelPatcher whose diffusion model holds the tiny UNet's weights rounded to bf16
    (so float32 and bf16 runs start from the same numbers)."""
    import copy

    dm = copy.deepcopy(model.get_model_object("diffusion_model")).to(torch.bfloat16).float()
    return types.SimpleNamespace(get_model_object=lambda name: dm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("func", ["attention_sub_quad", "attention_pytorch", "attention_basic", "attention_split"])
def test_comfyui_attention_functions_take_the_half_precision_bias_without_nan(comfy_host, func, dtype):
    """ComfyUI's own attention functions with RCCA's hard bias cast to half precision: rows whose
    allowed tokens score about 50 nats below the masked-out ones, and rows no prompt covers (fallback to
    block 0), stay finite and match a float64 reference (sub-quadratic subtracts the unmasked max
    before adding the mask, the hardest case for fp16's range)."""
    import comfy.ldm.modules.attention as attention

    core = comfy_host.pack_module("rcca_core.attention")
    g = torch.Generator().manual_seed(0)
    heads, d, n = 2, 8, 16
    u = torch.randn(heads * d, generator=g)
    u = u / u.norm()
    q = (u * 12).expand(1, n, -1) + 0.1 * torch.randn(1, n, heads * d, generator=g)
    k = 0.1 * torch.randn(1, 10, heads * d, generator=g)
    k[:, :5] -= u * 12  # block 0 (background): far from every query
    k[:, 5:] += u * 12  # block 1 (a region): close to every query
    v = torch.randn(1, 10, heads * d, generator=g)
    coverage = torch.zeros(1, 2, n)
    coverage[:, 0, :8] = 1.0  # first half: the background alone; second half: nothing -> fallback to block 0
    bias = core.region_bias(coverage, [5, 5], "hard")
    assert torch.isinf(bias[..., 5:]).all() and (bias[..., :5] == 0).all()
    want = attention.attention_basic(q.double(), k.double(), v.double(), heads, mask=bias.double())
    got = getattr(attention, func)(q.to(dtype), k.to(dtype), v.to(dtype), heads, mask=bias.to(dtype))
    assert torch.isfinite(got).all()
    tol = {torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]  # of |v| ~ 1, after rounding q and k (|q k| ~ 50)
    assert float((got.double() - want).abs().max()) < tol
