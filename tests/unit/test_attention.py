"""RCCA properties of the design, pinned on a cross-attention layer driven by ComfyUI's hook protocol."""

import copy
import hashlib

import pytest
import torch

from fake_unet import CrossAttention, run_layer, sdpa_attention
from rcca_core.attention import RCCAOptions, RegionalCrossAttention, parse_blocks, region_bias, row_layout
from rcca_core.masks import MaskPyramid
from rcca_core.palette import Palette, PaletteError, RegionSpec

CTX_DIM, DIM, HEADS = 12, 16, 2
KEY = ("input", 1, 0)


def encode(text: str, dtype=torch.float32) -> torch.Tensor:
    """Deterministic fake text encoder; token count varies with the text (as long prompts do)."""
    seed = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 5 + len(text) % 4, CTX_DIM, generator=g, dtype=dtype)


def make(specs, mode="soft", background="bg", width=32, height=24, **opts):
    layer = CrossAttention(DIM, CTX_DIM, HEADS)
    palette = Palette.build(specs, background, width, height, encode)
    rcca = RegionalCrossAttention(palette, {KEY: layer}, RCCAOptions(mode=mode, **opts))
    to = {}
    rcca.install(to_holder := {"transformer_options": to})
    return layer, palette, rcca, to_holder["transformer_options"]


def queries(batch, h, w, seed=1):
    return torch.randn(batch, h * w, DIM, generator=torch.Generator().manual_seed(seed))


def plain(layer, x, context, h, w):
    return run_layer(layer, x, context, h, w, {})


def halves(h=24, w=32):
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    return left, 1 - left


def test_full_canvas_region_equals_plain_prompt_with_cfg():
    h, w = 6, 8
    layer, _, _, to = make([RegionSpec("a red fox", torch.ones(24, 32))])
    x = queries(2, h, w)
    own = torch.cat([encode("bg"), encode("blurry")])  # rows: cond, uncond
    out = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1]})
    want_cond = plain(layer, x[:1], encode("a red fox"), h, w)
    want_uncond = plain(layer, x[1:], encode("blurry"), h, w)
    torch.testing.assert_close(out[:1], want_cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:], want_uncond, atol=1e-6, rtol=0)


def test_cfg_one_has_only_cond_rows():
    h, w = 6, 8
    layer, _, _, to = make([RegionSpec("a red fox", torch.ones(24, 32))])
    x = queries(1, h, w)
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    torch.testing.assert_close(out, plain(layer, x, encode("a red fox"), h, w), atol=1e-5, rtol=0)


def test_hard_disjoint_masks_isolate_regions():
    h, w = 6, 8
    left, right = halves()
    x = queries(1, h, w)
    outs = []
    for right_prompt in ("a blue car", "an old oak tree in autumn"):
        layer, _, _, to = make([RegionSpec("a cat", left), RegionSpec(right_prompt, right)], mode="hard")
        outs.append(run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]}).reshape(1, h, w, DIM))
    torch.testing.assert_close(outs[0][:, :, : w // 2], outs[1][:, :, : w // 2], atol=1e-6, rtol=0)
    assert (outs[0][:, :, w // 2:] - outs[1][:, :, w // 2:]).abs().max() > 1e-3  # the edited region did change


def _masses64(q, k, bias, heads, counts):
    """float64 softmax(QK^T/sqrt(d) + B) summed per token block: (B, heads, hw, blocks)."""
    b, n, inner = q.shape
    d = inner // heads
    q64, k64 = (t.double().reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k))
    bias = bias.double()
    attn = torch.softmax(q64 @ k64.transpose(-1, -2) / d ** 0.5 + (bias if bias.ndim == 4 else bias.unsqueeze(1)), dim=-1)
    return torch.stack([blk.sum(-1) for blk in attn.split(counts, dim=-1)], dim=-1)


def test_soft_masks_give_formula_attention_mass():
    h, w = 6, 8
    ramp = torch.linspace(0, 1, 32).expand(24, 32).contiguous()
    specs = [RegionSpec("a dog", ramp * 0.5), RegionSpec("a cat", (1 - ramp) * 0.7)]
    layer, palette, rcca, to = make(specs)
    x = queries(1, h, w)
    seen = {}

    def capture(func, q, k, v, heads, mask=None, **kw):  # an earlier override, as another pack would install
        seen.update(q=q, k=k, mask=mask)
        return func(q, k, v, heads, mask=mask, **kw)

    rcca.previous_override = capture
    run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    counts = [encode("bg").shape[1]] + [r.context.shape[1] for r in palette.regions]
    got = _masses64(seen["q"], seen["k"], seen["mask"], HEADS, counts)

    # independent float64 reference: in every head each prompt's block gets exactly its coverage
    # (coverage at or below eps counts as none; the rest renormalised), whatever its keys
    cov = torch.nn.functional.interpolate(palette.region_coverage().double(), size=(h, w), mode="area").flatten(2)
    m = torch.cat([(1 - cov.sum(1, keepdim=True)).clamp(0, 1), cov], dim=1).transpose(1, 2).unsqueeze(1)  # (1,1,hw,3)
    m = torch.where(m > 1e-4, m, torch.zeros_like(m))
    want = (m / m.sum(-1, keepdim=True)).expand(-1, HEADS, -1, -1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got.sum(-1), torch.ones_like(got[..., 0]).double())
    # the layer output is the coverage-weighted mix of each prompt's own attention
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    d = DIM // HEADS
    alone = [plain(layer, x, ctx, h, w).reshape(1, h * w, HEADS, d).transpose(1, 2)
             for ctx in [encode("bg")] + [r.context for r in palette.regions]]
    mix = sum(m[..., i, None].float() * a for i, a in enumerate(alone)) / m.sum(-1, keepdim=True).float()
    torch.testing.assert_close(out, mix.transpose(1, 2).reshape(1, h * w, DIM), atol=1e-5, rtol=0)


def test_opacity_blends_monotonically_at_the_layer():
    """A 25 / 50 / 75 / 100 % region over the background: the share of the region prompt in the
    layer output rises with opacity, whichever prompt's keys match the pixels better."""
    h, w = 6, 8
    x = queries(1, h, w, seed=3)
    shares = []
    for opacity in (0.25, 0.5, 0.75, 1.0):
        layer, palette, _, to = make([RegionSpec("a dog", torch.ones(24, 32), opacity)])
        out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
        dog, bg = plain(layer, x, encode("a dog"), h, w), plain(layer, x, encode("bg"), h, w)
        shares.append(float(((out - bg) * (dog - bg)).sum().detach() / ((dog - bg) ** 2).sum().detach()))
    assert shares == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=1e-4)


def test_zero_coverage_rows_fall_back_to_background_without_nan():
    h, w = 4, 4
    faint = torch.full((24, 32), 0.3)
    layer, _, _, to = make([RegionSpec("a dog", faint), RegionSpec("a cat", faint)], mode="hard")  # all < 0.5
    x = queries(1, h, w)
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, plain(layer, x, encode("bg"), h, w), atol=1e-5, rtol=0)


def test_region_bias_rows_always_have_a_finite_entry():
    weights = torch.tensor([[[0.0, 0.2, 1.0], [0.0, 0.0, 0.0], [0.0, 0.9, 0.0]]])  # (1, K=3, hw=3)
    for mode in ("soft", "hard"):
        bias = region_bias(weights, [2, 1, 3], mode)
        assert bias.shape == (1, 3, 6)
        assert torch.isfinite(bias).any(-1).all()
    soft = region_bias(weights, [2, 1, 3], "soft")
    assert soft[0, 0, 0] == 0 and torch.isinf(soft[0, 0, 2:3]).all()  # pixel 0: nothing covers it -> background
    torch.testing.assert_close(soft[0, 1], torch.log(torch.tensor([0.2, 0.2, 0.0, 0.9, 0.9, 0.9])))  # log M per token


def test_batch_with_per_sample_masks():
    h, w = 6, 8
    left, right = halves()
    x = queries(2, h, w)
    layer, _, _, to = make([RegionSpec("a dog", torch.stack([left, right])), RegionSpec("a cat", torch.stack([right, left]))])
    out = run_layer(layer, x, encode("bg").expand(2, -1, -1), h, w, {**to, "cond_or_uncond": [0]})
    for i, (m1, m2) in enumerate(((left, right), (right, left))):
        layer1, _, _, to1 = make([RegionSpec("a dog", m1), RegionSpec("a cat", m2)])
        want = run_layer(layer1, x[i:i + 1], encode("bg"), h, w, {**to1, "cond_or_uncond": [0]})
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-6, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_batch_of_latents_shares_one_mask_set_with_cfg():
    h, w = 6, 8
    left, right = halves()
    x = queries(4, h, w)  # 2 latents x (cond, uncond)
    layer, _, _, to = make([RegionSpec("a dog", left), RegionSpec("a cat", right)])
    own = torch.cat([encode("bg")] * 2 + [encode("blurry")] * 2)
    out = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1]})
    for i in range(2):
        single = run_layer(layer, x[i:i + 1], encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
        torch.testing.assert_close(out[i:i + 1], single, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[2 + i:3 + i], plain(layer, x[2 + i:3 + i], encode("blurry"), h, w), atol=1e-6, rtol=0)


def test_mask_batch_must_match_latent_batch():
    h, w = 6, 8
    left, right = halves()
    layer, _, _, to = make([RegionSpec("a dog", torch.stack([left, right, left]))])
    with pytest.raises(PaletteError, match="3 mask sets but the latent batch has 2"):
        run_layer(layer, queries(2, h, w), encode("bg").expand(2, -1, -1), h, w, {**to, "cond_or_uncond": [0]})


@pytest.mark.parametrize("h,w,canvas", [(5, 7, (40, 56)), (9, 5, (72, 40)), (3, 3, (24, 24))])
def test_odd_and_non_square_layers(h, w, canvas):
    H, W = canvas
    top = torch.zeros(H, W)
    top[: H // 2] = 1
    layer, _, _, to = make([RegionSpec("sky", top)], width=W, height=H)
    x = queries(1, h, w)
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    assert out.shape == (1, h * w, DIM) and torch.isfinite(out).all()
    # the first row is fully inside the top region: exactly the region prompt there
    torch.testing.assert_close(out[:, :w], plain(layer, x, encode("sky"), h, w)[:, :w], atol=1e-5, rtol=0)


def test_kv_of_region_prompts_is_cached_until_weights_change():
    h, w = 4, 4
    layer, _, _, to = make([RegionSpec("a dog", torch.ones(24, 32))])
    calls = []
    layer.to_k.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    x = queries(1, h, w)
    first = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    region_tokens = encode("a dog").shape[1]
    assert calls.count(region_tokens) == 1  # projected once, reused on the second step
    layer.to_k.weight = torch.nn.Parameter(layer.to_k.weight * 2)  # what a LoRA load does
    second = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    assert calls.count(region_tokens) == 2
    torch.testing.assert_close(second, plain(layer, x, encode("a dog"), h, w), atol=1e-5, rtol=0)
    assert (second - first).abs().max() > 1e-4


def test_composes_with_other_patches_and_an_earlier_override():
    h, w = 4, 4
    layer, _, rcca, to = make([RegionSpec("a dog", torch.ones(24, 32))])
    seen = []

    def earlier_override(func, *args, **kwargs):
        seen.append(args[1].shape[1])
        return func(*args, **kwargs)

    rcca.previous_override = earlier_override
    other_calls = []

    def other_attn2_patch(n, context, value, extra):
        other_calls.append(extra["block"])
        return n, context, value

    to["patches"]["attn2_patch"].insert(0, other_attn2_patch)
    x = queries(1, h, w)
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    assert other_calls == [KEY[:2]]
    assert seen == [encode("bg").shape[1] + encode("a dog").shape[1]]  # earlier override saw the extended context
    torch.testing.assert_close(out, plain(layer, x, encode("a dog"), h, w), atol=1e-5, rtol=0)


def test_attn1_disarms_so_a_swallowed_attn2_never_leaks_into_self_attention():
    h, w = 4, 4
    layer, _, rcca, to = make([RegionSpec("a dog", torch.ones(24, 32))])
    extra = {"block": ("input", 1), "block_index": 0, "activations_shape": [1, DIM, h, w], "cond_or_uncond": [0]}
    x = queries(1, h, w)
    rcca.attn2_patch(x, encode("bg"), encode("bg"), extra)  # armed; imagine an attn2 replacement skipped the override
    rcca.attn1_patch(x, x, x, extra)
    q, k, v = layer.to_q(x), layer.to_q(x), layer.to_q(x)
    out = rcca.attention_override(sdpa_attention, q, k, v, HEADS, transformer_options=to)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, HEADS))


def test_unselected_blocks_and_sigma_range_leave_attention_plain():
    h, w = 4, 4
    x = queries(1, h, w)
    layer, _, _, to = make([RegionSpec("a dog", torch.ones(24, 32))], blocks=parse_blocks("output, middle"))
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    torch.testing.assert_close(out, plain(layer, x, encode("bg"), h, w))
    layer, _, _, to = make([RegionSpec("a dog", torch.ones(24, 32))], sigma_start=5.0, sigma_end=1.0)
    for sigma, want in ((10.0, "bg"), (3.0, "a dog"), (0.5, "bg")):
        out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0], "sigmas": torch.tensor([sigma])})
        torch.testing.assert_close(out, plain(layer, x, encode(want), h, w), atol=1e-5, rtol=0)


def test_region_negative_prompts_constrain_uncond_rows():
    h, w = 6, 8
    left, right = halves()
    x = queries(2, h, w)
    own = torch.cat([encode("bg"), encode("blurry")])
    # a region whose negative is the shared negative behaves exactly like one without
    layer, _, _, to = make([RegionSpec("a dog", left, negative="blurry"), RegionSpec("a cat", right)])
    out = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1]})
    torch.testing.assert_close(out[1:], plain(layer, x[1:], encode("blurry"), h, w), atol=1e-5, rtol=0)
    # a distinct negative applies inside its region only
    layer, _, _, to = make([RegionSpec("a dog", left, negative="extra legs"), RegionSpec("a cat", right)], mode="hard")
    out = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1]}).reshape(2, h, w, DIM)
    want_left = plain(layer, x[1:], encode("extra legs"), h, w).reshape(1, h, w, DIM)
    want_right = plain(layer, x[1:], encode("blurry"), h, w).reshape(1, h, w, DIM)
    torch.testing.assert_close(out[1:, :, : w // 2], want_left[:, :, : w // 2], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:, :, w // 2:], want_right[:, :, w // 2:], atol=1e-5, rtol=0)


def test_deepcopy_shares_the_hook_object():
    _, _, rcca, to = make([RegionSpec("a dog", torch.ones(24, 32))])
    copied = copy.deepcopy(to)
    assert copied["optimized_attention_override"].__self__ is rcca


def test_pyramid_from_another_palette_is_refused():
    palette = Palette.build([RegionSpec("a dog", torch.ones(24, 32))], "bg", 32, 24, encode)
    other = MaskPyramid(torch.ones(1, 2, 24, 32))
    with pytest.raises(PaletteError, match="not made from this palette"):
        RegionalCrossAttention(palette, {}, RCCAOptions(), other)


def test_options_and_blocks_are_validated():
    with pytest.raises(PaletteError, match="attention mode"):
        RCCAOptions(mode="medium")
    with pytest.raises(PaletteError, match="cannot read 'decoder'"):
        parse_blocks("input, decoder")
    assert parse_blocks("all") is None
    assert parse_blocks("input:4, middle") == frozenset({("input", 4), ("middle", None)})


def test_per_latent_palettes_via_transformer_options_rows():
    """A stream batch: every latent has its own palette (prompts of different token counts)."""
    h, w = 6, 8
    left, right = halves()
    layer, _, rcca, to = make([RegionSpec("a dog", left)])
    pa = rcca.prepare(Palette.build([RegionSpec("a dog", left), RegionSpec("a cat", right)], "bg", 32, 24, encode))
    pb = rcca.prepare(Palette.build([RegionSpec("a long prompt about a red car", right)], "bg", 32, 24, encode))
    assert pa.extra_tokens != pb.extra_tokens
    x = queries(4, h, w)  # latents (A, B) x (cond, uncond)
    own = torch.cat([encode("bg")] * 2 + [encode("blurry")] * 2)
    out = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1], "rcca_rows": (pa, pb)})
    for i, prepared in enumerate((pa, pb)):
        single_layer, _, _, single_to = make([r.spec for r in prepared.palette.regions])
        want = run_layer(single_layer, x[i:i + 1], encode("bg"), h, w, {**single_to, "cond_or_uncond": [0]})
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[2 + i:3 + i], plain(layer, x[2 + i:3 + i], encode("blurry"), h, w), atol=1e-5, rtol=0)
    again = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1], "rcca_rows": (pa, pb)})
    torch.testing.assert_close(again, out, atol=0, rtol=0)  # the cached combination gives the same
    with pytest.raises(PaletteError, match="3 per-latent palettes for a batch of 2"):
        run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": [0, 1], "rcca_rows": (pa, pb, pa)})


def test_uninstall_removes_the_hooks_and_restores_an_earlier_override():
    layer = CrossAttention(DIM, CTX_DIM, HEADS)
    palette = Palette.build([RegionSpec("a dog", torch.ones(24, 32))], "bg", 32, 24, encode)

    def earlier(func, *args, **kwargs):
        return func(*args, **kwargs)

    def other_patch(n, context, value, extra):
        return n, context, value

    options = {"transformer_options": {"optimized_attention_override": earlier, "patches": {"attn2_patch": [other_patch]}}}
    rcca = RegionalCrossAttention(palette, {KEY: layer}, previous_override=earlier)
    rcca.install(options)
    assert RegionalCrossAttention.installed_in(options) is rcca
    rcca.uninstall(options)
    to = options["transformer_options"]
    assert RegionalCrossAttention.installed_in(options) is None
    assert to["patches"]["attn2_patch"] == [other_patch] and to["patches"]["attn1_patch"] == []
    assert to["optimized_attention_override"] is earlier


@pytest.mark.parametrize("rows, latents, armed, live, want", [
    (2, 1, (0, 1), [0, 1], (0, 1)),                 # nothing expanded
    (4, 1, (1, 0), [1, 0, 0, 0], (1, 0, 0, 0)),     # a couple kept the live list in step
    (6, 2, (0, 1), [0, 0, 1], (0, 0, 1)),           # ... with two latents per chunk
    (3, 1, (0,), [0], (0, 0, 0)),                   # cfg 1: every row is a prompt row, whatever expanded it
    (2, 1, (0, 1), None, (0, 1)),                   # no live list: the layout armed with
])
def test_row_layout_follows_what_reaches_the_attention(rows, latents, armed, live, want):
    assert row_layout(rows, latents, armed, live) == want


def test_row_layout_refuses_an_expansion_it_cannot_attribute():
    with pytest.raises(PaletteError, match=r"expanded this layer's batch from 2 rows .* to 3 rows without updating"):
        row_layout(3, 1, (0, 1), [0, 1])
    with pytest.raises(PaletteError, match="does not hold whole chunks"):
        row_layout(3, 2, (0, 1), [0, 1])


def couple_patch(regions: list[torch.Tensor], keep_list_in_step: bool):
    """An attention couple's attn2_patch in miniature: each cond chunk becomes one chunk per couple prompt
    (the tests read the expanded rows themselves, so there is no output patch folding them back)."""
    def attn2_patch(n, context, value, extra):
        cu = extra["cond_or_uncond"]
        b = n.shape[0] // len(cu)
        ns, cs = [], []
        for i, kind in enumerate(list(cu)):
            rows, ctx = n[i * b:(i + 1) * b], context[i * b:(i + 1) * b]
            if kind == 1:
                ns.append(rows), cs.append(ctx)
            else:
                ns += [rows] * len(regions)
                cs += [r.expand(b, -1, -1) for r in regions]
        if keep_list_in_step:
            expanded = [k for kind in cu for k in ([kind] if kind == 1 else [0] * len(regions))]
            cu[:] = expanded
        cat = torch.cat(cs)
        return torch.cat(ns), cat, cat

    return attn2_patch


@pytest.mark.parametrize("rcca_first", [True, False])
def test_a_couple_that_keeps_cond_or_uncond_in_step_gets_rcca_on_every_prompt_row(rcca_first):
    h, w = 6, 8
    left, _ = halves()
    layer, _, rcca, to = make([RegionSpec("a red fox", left)], mode="hard")
    couples = [encode("peer one")[:, :5], encode("peer two")[:, :5]]
    patch = couple_patch(couples, keep_list_in_step=True)
    lst = to["patches"]["attn2_patch"]
    lst.insert(len(lst) if rcca_first else 0, patch)
    x = queries(2, h, w)
    own = torch.cat([encode("bg")[:, :5], encode("blurry")[:, :5]])  # rows: uncond, cond
    cu = [1, 0]
    out = run_layer(layer, x, own, h, w, {**to, "cond_or_uncond": cu, "uuids": ["u", "c"]})
    assert cu == [1, 0, 0]  # the couple's expansion reached the attention call
    assert out.shape[0] == 3
    torch.testing.assert_close(out[:1], plain(layer, x[:1], own[:1], h, w), atol=1e-6, rtol=0)  # uncond untouched
    fox = plain(layer, x[1:], encode("a red fox"), h, w).view(h, w, -1)
    for row, couple in zip(out[1:], couples):
        row = row.view(h, w, -1)
        torch.testing.assert_close(row[:, : w // 2], fox[:, : w // 2], atol=1e-5, rtol=0)  # RCCA's region
        alone = plain(layer, x[1:], couple, h, w).view(h, w, -1)
        torch.testing.assert_close(row[:, w // 2:], alone[:, w // 2:], atol=1e-5, rtol=0)  # the couple's own prompt


def test_an_expansion_that_hides_the_uncond_rows_is_refused():
    h, w = 4, 4
    layer, _, rcca, to = make([RegionSpec("a red fox", torch.ones(24, 32))])
    patch = couple_patch([encode("peer")[:, :5]] * 2, keep_list_in_step=False)
    to["patches"]["attn2_patch"].append(patch)
    own = torch.cat([encode("bg")[:, :5], encode("blurry")[:, :5]])
    with pytest.raises(PaletteError, match="without updating transformer_options\\['cond_or_uncond'\\]"):
        run_layer(layer, queries(2, h, w), own, h, w, {**to, "cond_or_uncond": [0, 1]})


def test_an_attention_that_never_reaches_the_override_is_reported():
    h, w = 4, 4
    layer, _, rcca, to = make([RegionSpec("a red fox", torch.ones(24, 32))])
    x = queries(1, h, w)
    ignoring = {**to, "optimized_attention_override": None, "cond_or_uncond": [0]}  # like an attn2_replace
    with pytest.raises(PaletteError, match=r"cannot act at cross-attention layer \('input', 1, 0\).*attn2_replace"):
        run_layer(layer, x, encode("bg"), h, w, ignoring)
    # after the error the hooks are clean: the next (unreplaced) call works
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    torch.testing.assert_close(out, plain(layer, x, encode("a red fox"), h, w), atol=1e-5, rtol=0)


def _self_attention(layer, rcca, to, x, h, w, cond_or_uncond, sigma=10.0):
    """One attn1 call in ComfyUI's protocol: attn1_patch list, then the override around attention."""
    extra = {"block": KEY[:2], "block_index": KEY[2], "activations_shape": [x.shape[0], DIM, h, w],
             "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.full((x.shape[0],), sigma)}
    rcca.attn1_patch(x, x, x, extra)
    q, k, v = layer.to_q(x), layer.to_q(x), layer.to_q(x)
    return rcca.attention_override(sdpa_attention, q, k, v, HEADS, transformer_options={**to, **extra})


def test_self_attention_keeps_to_regions_early_and_only_on_prompt_rows():
    h, w = 6, 8
    left, right = halves()
    layer, _, rcca, to = make([RegionSpec("a fox", left), RegionSpec("a car", right)], mode="hard", self_sigma_end=5.0)
    x = queries(2, h, w)
    other = x.clone().view(2, h, w, DIM)
    other[:, :, w // 2:] += 3.0  # change only the right half's pixels
    other = other.view(2, h * w, DIM)
    outs = [_self_attention(layer, rcca, to, t, h, w, [0, 1]).view(2, h, w, DIM) for t in (x, other)]
    torch.testing.assert_close(outs[0][0, :, : w // 2], outs[1][0, :, : w // 2], atol=1e-6, rtol=0)  # cond: isolated
    assert (outs[0][1, :, : w // 2] - outs[1][1, :, : w // 2]).abs().max() > 1e-3  # uncond: plain self-attention
    late = [_self_attention(layer, rcca, to, t, h, w, [0, 1], sigma=1.0).view(2, h, w, DIM) for t in (x, other)]
    assert (late[0][0, :, : w // 2] - late[1][0, :, : w // 2]).abs().max() > 1e-3  # below self_sigma_end: plain
    torch.testing.assert_close(late[0], sdpa_attention(layer.to_q(x), layer.to_q(x), layer.to_q(x), HEADS).view(2, h, w, DIM))


# -- low precision ---------------------------------------------------------------------------
# Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2 %), fp16 11 bits (0.05 %).
# The layer outputs are compared with the same layer in float32 on the same (rounded) weights and
# inputs, so the difference is what RCCA's bias path and the half-precision attention add; the
# attention shares are read back from the bias the attention function received.
LOW_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # max abs error / max |output|
SHARE_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _half_ops_missing(dtype) -> str | None:
    """The op this CPU build lacks for `dtype`, if any (fp16 matmul / SDPA are missing on some CPUs)."""
    a = torch.randn(1, 2, 4, 8).to(dtype)
    for name, op in (("matmul", lambda: a @ a.transpose(-1, -2)),
                     ("scaled_dot_product_attention", lambda: torch.nn.functional.scaled_dot_product_attention(
                         a, a, a, attn_mask=torch.zeros(1, 1, 4, 4, dtype=dtype))),
                     ("linear", lambda: torch.nn.functional.linear(a, torch.ones(8, 8, dtype=dtype))),
                     ("softmax", lambda: a.softmax(-1))):
        try:
            op()
        except (RuntimeError, NotImplementedError) as e:
            return f"{name} in {dtype} is not implemented on this CPU ({str(e).splitlines()[0][:80]})"
    return None


def _low_precision_palette(mode):
    """Soft ramps with a region negative and a corner no prompt covers (rows that fall back to block 0)."""
    ramp = torch.linspace(0, 1, 32).expand(24, 32).contiguous()
    dog, cat = ramp * 0.5, (1 - ramp) * 0.7
    cat[:, :8] = 0.0  # left quarter: dog < 0.5 and cat 0 -> hard mode falls back to the background there
    return [RegionSpec("a dog", dog), RegionSpec("a cat", cat, negative="extra legs")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_half_precision_matches_float32(dtype, mode):
    missing = _half_ops_missing(dtype)
    if missing:
        pytest.skip(missing)
    h, w = 6, 8
    layer, palette, rcca, to = make(_low_precision_palette(mode), mode=mode, self_sigma_end=1.0)
    low = CrossAttention(DIM, CTX_DIM, HEADS)
    low.load_state_dict(layer.state_dict())
    low = low.to(dtype)
    ref_layer = CrossAttention(DIM, CTX_DIM, HEADS)
    ref_layer.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # the rounded weights, in fp32
    x = queries(2, h, w).to(dtype)
    own = torch.cat([encode("bg"), encode("blurry")]).to(dtype)
    outs = {}
    for name, lay, dt in (("low", low, dtype), ("ref", ref_layer, torch.float32)):
        rcca.layers[KEY] = lay
        opts = {**to, "cond_or_uncond": [0, 1]}
        cross = run_layer(lay, x.to(dt), own.to(dt), h, w, opts)
        self_ = _self_attention(lay, rcca, to, x.to(dt), h, w, [0, 1], sigma=10.0)
        outs[name] = (cross, self_)
    for got, want in zip(outs["low"], outs["ref"]):
        assert got.dtype == dtype and torch.isfinite(got).all()
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= LOW_TOL[dtype] * scale
    if mode == "hard":  # fallback rows (left quarter): exactly the background prompt's attention, in dtype too
        rcca.layers[KEY] = low
        cross = run_layer(low, x[:1], own[:1], h, w, {**to, "cond_or_uncond": [0]}).view(1, h, w, DIM)
        bg = plain(low, x[:1], own[:1], h, w).view(1, h, w, DIM)
        torch.testing.assert_close(cross[:, :, :2], bg[:, :, :2], atol=LOW_TOL[dtype] * float(bg.detach().abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_soft_shares_are_the_coverage(dtype):
    """The normalisation runs in float32 from the half-precision q / k, so the attention function,
    adding the half-precision bias to its logits, still gives every prompt its coverage."""
    missing = _half_ops_missing(dtype)
    if missing:
        pytest.skip(missing)
    h, w = 6, 8
    ramp = torch.linspace(0, 1, 32).expand(24, 32).contiguous()
    layer, palette, rcca, to = make([RegionSpec("a dog", ramp * 0.5), RegionSpec("a cat", (1 - ramp) * 0.7)])
    layer = layer.to(dtype)
    rcca.layers[KEY] = layer
    seen = {}

    def capture(func, q, k, v, heads, mask=None, **kw):
        seen.update(q=q, k=k, mask=mask)
        return func(q, k, v, heads, mask=mask, **kw)

    rcca.previous_override = capture
    out = run_layer(layer, queries(1, h, w).to(dtype), encode("bg").to(dtype), h, w, {**to, "cond_or_uncond": [0]})
    assert seen["mask"].dtype == dtype and torch.isfinite(out).all()
    assert torch.isfinite(seen["mask"]).any(-1).all()  # every row keeps a finite entry in dtype
    counts = [encode("bg").shape[1]] + [r.context.shape[1] for r in palette.regions]
    got = _masses64(seen["q"], seen["k"], seen["mask"], HEADS, counts)
    cov = torch.nn.functional.interpolate(palette.region_coverage().double(), size=(h, w), mode="area").flatten(2)
    m = torch.cat([(1 - cov.sum(1, keepdim=True)).clamp(0, 1), cov], dim=1).transpose(1, 2).unsqueeze(1)
    m = torch.where(m > 1e-4, m, torch.zeros_like(m))
    want = (m / m.sum(-1, keepdim=True)).expand(-1, HEADS, -1, -1)
    torch.testing.assert_close(got, want, atol=SHARE_TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_bias_keeps_fallback_rows_and_no_nan(dtype):
    """region_bias works in float32 whatever the coverage dtype; cast to half, -inf stays -inf,
    every row keeps a finite entry, and a softmax over an all-unfavourable row is still finite."""
    weights = torch.tensor([[[0.0, 0.2, 1.0], [0.0, 0.0, 0.0], [0.0, 0.9, 0.0]]]).to(dtype)
    for mode in ("soft", "hard"):
        bias = region_bias(weights, [2, 1, 3], mode)
        assert bias.dtype == torch.float32
        half = bias.to(dtype)
        assert torch.isfinite(half).any(-1).all() and not torch.isnan(half).any()
        assert half[0, 0, 0] == 0  # the row no prompt covers falls back to block 0
        # logits that strongly favour the masked-out tokens: the allowed ones still share the row
        logits = torch.tensor([-60.0, -60.0, 60.0, 60.0, 60.0, 60.0], dtype=torch.float32).to(dtype)
        probs = torch.softmax((logits + half).float(), dim=-1)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs[0, 0, :2].sum(), torch.tensor(1.0))


@pytest.mark.parametrize("weight", [2.0, 0.5])
def test_region_weight_scales_its_share_where_prompts_mix(weight):
    """weight w adds log w to the region's logits: where it mixes with the background its share
    becomes w M / (w M + M_0) (at 50 % opacity: 2/3 at w = 2, 1/3 at w = 0.5); where it is alone
    (100 %) the row reads one prompt and nothing changes."""
    h, w = 6, 8
    half = torch.zeros(24, 32)
    half[:, :16] = 0.5
    half[:, 16:] = 1.0
    layer, palette, rcca, to = make([RegionSpec("a dog", half, weight=weight)])
    seen = {}

    def capture(func, q, k, v, heads, mask=None, **kw):
        seen.update(q=q, k=k, mask=mask)
        return func(q, k, v, heads, mask=mask, **kw)

    rcca.previous_override = capture
    x = queries(1, h, w)
    out = run_layer(layer, x, encode("bg"), h, w, {**to, "cond_or_uncond": [0]})
    counts = [encode("bg").shape[1], palette.regions[0].context.shape[1]]
    got = _masses64(seen["q"], seen["k"], seen["mask"], HEADS, counts).reshape(1, HEADS, h, w, 2)
    share = weight * 0.5 / (weight * 0.5 + 0.5)
    torch.testing.assert_close(got[..., :4, 1], torch.full_like(got[..., :4, 1], share), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[..., 4:, 1], torch.ones_like(got[..., 4:, 1]), atol=1e-6, rtol=0)
    with pytest.raises(PaletteError, match=r"weight must be a number in \(0, 10\]"):
        RegionSpec("a dog", half, weight=0.0)
    assert torch.isfinite(out).all()
