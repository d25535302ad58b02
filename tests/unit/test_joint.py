"""RCCA on joint attention (SD3 / Flux): the properties of rcca_core.joint, pinned on a fake
MMDiT block that follows ComfyUI's attention-override protocol (tests/unit/fake_mmdit.py)."""

import hashlib

import pytest
import torch

from fake_mmdit import JointBlock, sdpa
from rcca_core.joint import CALL_KEY, JointOptions, JointRegionalAttention, first_tokens, \
    joint_bias, normalize_joint_mass, token_grid
from rcca_core.palette import Palette, PaletteError, RegionSpec

DIM, HEADS = 16, 2
H, W = 6, 8  # image tokens; latent 12 x 16 in 2 x 2 patches; canvas 64 x 48 px


def encode(text: str) -> torch.Tensor:
    seed = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
    return torch.randn(1, 3 + len(text) % 4, DIM, generator=torch.Generator().manual_seed(seed))


def make(specs, background="bg", **opts) -> JointRegionalAttention:
    return JointRegionalAttention(Palette.build(specs, background, 64, 48, encode), JointOptions(**opts), patch=2)


def image(batch=1, seed=3):
    return torch.randn(batch, H * W, DIM, generator=torch.Generator().manual_seed(seed))


def run(joint, block, img, own, layout=(0,), latent=None, sigmas=None):
    holder = {"transformer_options": {}}
    joint.install(holder)
    to = {**holder["transformer_options"], "cond_or_uncond": list(layout)}
    if sigmas is not None:
        to["sigmas"] = sigmas
    latent = latent or (img.shape[0], 16, 2 * H, 2 * W)
    options = joint.with_call(to, latent, own.shape[1], torch.float32, img.device)
    txt, out = block(joint.extend_context(own), img, options)
    assert options[CALL_KEY]["calls"] == 1
    return txt, out


def halves():
    left = torch.zeros(48, 64)
    left[:, :32] = 1
    return left, 1 - left


@pytest.mark.parametrize("layout", ["flux", "sd3"])
def test_full_canvas_region_equals_plain_prompt_with_cfg(layout):
    block = JointBlock(DIM, HEADS, layout)
    joint = make([RegionSpec("a red fox", torch.ones(48, 64))])
    img = image(2)
    own = torch.cat([encode("bg"), encode("blurry")])  # rows: cond, uncond (same length here)
    txt, out = run(joint, block, img, own, layout=(0, 1))
    want_txt, want = block(encode("a red fox"), img[:1], {})
    torch.testing.assert_close(out[:1], want, atol=1e-5, rtol=0)
    fox = slice(own.shape[1], own.shape[1] + encode("a red fox").shape[1])
    torch.testing.assert_close(txt[:1, fox], want_txt, atol=1e-5, rtol=0)
    want_txt, want = block(encode("blurry"), img[1:], {})  # uncond rows: their own context, unmasked
    torch.testing.assert_close(out[1:], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt[1:, :own.shape[1]], want_txt, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_disjoint_regions_isolate_image_and_text(mode):
    block = JointBlock(DIM, HEADS, "flux")
    left, right = halves()
    img = image()
    txt_a, out_a = run(make([RegionSpec("a fox", left), RegionSpec("a car", right)], mode=mode), block, img, encode("bg"))
    txt_b, out_b = run(make([RegionSpec("a fox", left), RegionSpec("a dog in a hat", right)], mode=mode), block, img,
                       encode("bg"))
    grid = lambda t: t.reshape(1, H, W, DIM)
    torch.testing.assert_close(grid(out_a)[:, :, :W // 2], grid(out_b)[:, :, :W // 2], atol=1e-6, rtol=0)
    assert not torch.allclose(grid(out_a)[:, :, W // 2:], grid(out_b)[:, :, W // 2:], atol=1e-3)
    fox = slice(encode("bg").shape[1], encode("bg").shape[1] + encode("a fox").shape[1])
    torch.testing.assert_close(txt_a[:, fox], txt_b[:, fox], atol=1e-6, rtol=0)


def test_region_text_reads_only_its_region_unless_everywhere():
    block = JointBlock(DIM, HEADS, "sd3")
    left, right = halves()
    specs = [RegionSpec("a fox", left), RegionSpec("a car", right)]
    img = image()
    changed = img.reshape(1, H, W, DIM).clone()
    changed[:, :, W // 2:] += 1.0  # the car's half of the image
    changed = changed.reshape(1, H * W, DIM)
    fox = slice(encode("bg").shape[1], encode("bg").shape[1] + encode("a fox").shape[1])
    bg = slice(0, encode("bg").shape[1])
    for sees, fox_moves in (("region", False), ("everywhere", True)):
        joint = make(specs, mode="hard", text_sees=sees)
        txt_a, _ = run(joint, block, img, encode("bg"))
        txt_b, _ = run(joint, block, changed, encode("bg"))
        assert torch.allclose(txt_a[:, fox], txt_b[:, fox], atol=1e-6) != fox_moves
        assert not torch.allclose(txt_a[:, bg], txt_b[:, bg], atol=1e-3)  # the background reads the whole image


def test_bias_layout_over_the_joint_sequence():
    ramp = torch.linspace(0, 1, 64).expand(48, 64).contiguous()
    joint = make([RegionSpec("a fox", ramp, negative="ugly"), RegionSpec("a car", 1 - ramp)])
    prepared = joint.prepared
    counts = prepared.counts(4)
    text = sum(counts)
    cond, _ = prepared.bias(H, W, 4, True, torch.device("cpu"))[0]
    assert cond.shape == (1, text + H * W, text + H * W)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    same = ids[:, None] == ids[None, :]
    assert bool((cond[0, :text, :text][same] == 0).all()) and bool(torch.isinf(cond[0, :text, :text][~same]).all())
    assert bool((cond[0, text:, text:] == 0).all())  # image -> image unchanged
    assert bool((cond[0, :counts[0], text:] == 0).all())  # the background prompt reads the whole image
    negative = slice(text - counts[-1], text)  # the fox's negative: unused on cond rows
    assert bool(torch.isinf(cond[0, text:, negative]).all()) and bool(torch.isinf(cond[0, negative, text:]).all())
    uncond, _ = prepared.bias(H, W, 4, True, torch.device("cpu"))[1]
    fox = slice(counts[0], counts[0] + counts[1])
    assert bool(torch.isinf(uncond[0, text:, fox]).all())  # uncond rows never read region prompts
    assert torch.isfinite(uncond[0, text:, negative]).any()  # ... but the fox's negative inside the fox


def test_soft_masses_match_a_float64_reference():
    ramp = torch.linspace(-0.5, 1, 64).clamp_min(0).expand(48, 64).contiguous()  # none in the left quarter
    blob = torch.zeros(48, 64)
    blob[8:40, 16:48] = 0.4
    joint = make([RegionSpec("a fox", ramp * 0.7), RegionSpec("a car", blob)], mode="soft")
    prepared = joint.prepared
    own = 5
    counts = prepared.counts(own)
    text = sum(counts)
    bias, mixed = prepared.bias(H, W, own, True, torch.device("cpu"))[0]
    assert mixed
    g = torch.Generator().manual_seed(7)
    length, d = text + H * W, 8
    q = torch.randn(2, HEADS, length, d, generator=g)
    k = torch.randn(2, HEADS, length, d, generator=g)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    first = torch.tensor(first_tokens(counts))
    bias = bias.expand(2, -1, -1)
    final = normalize_joint_mass(q, k, HEADS, bias, text, ids, first).double()
    raw = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    prob = torch.softmax(raw + final, dim=-1)  # (2, heads, L, L)
    onehot = torch.nn.functional.one_hot(ids, len(counts)).double()
    mass = prob[:, :, text:, :text] @ onehot  # (2, heads, hw, K)
    image_mass = prob[:, :, text:, text:].sum(-1)
    weight = bias[:, text:, first].double().exp()[:, None]  # W_k(p), 0 where a block is not read
    z = raw[:, :, text:, :text].exp() @ onehot  # Z_k(p) per head
    z_image = raw[:, :, text:, text:].exp().sum(-1)
    several = (weight > 0).sum(-1) > 1
    assert several.any() and (~several).any()
    share = weight / weight.sum(-1, keepdim=True)
    got_share = mass / mass.sum(-1, keepdim=True)
    torch.testing.assert_close(got_share[several.expand_as(got_share[..., 0])], share.expand_as(got_share)[
        several.expand_as(got_share[..., 0])], atol=1e-5, rtol=1e-5)
    want_ratio = (weight * z).sum(-1) / weight.sum(-1) / z_image  # text vs image mass
    got_ratio = mass.sum(-1) / image_mass
    sel = several.expand_as(got_ratio)
    torch.testing.assert_close(got_ratio[sel], want_ratio[sel], rtol=1e-5, atol=0)
    # rows reading one prompt keep the bias exactly
    single = (~several).expand_as(got_ratio)
    assert torch.equal(final[:, :, text:][single], bias.double()[:, None].expand_as(final)[:, :, text:][single])


def test_hard_mode_and_single_prompt_rows_never_normalise():
    left, right = halves()
    for mode in ("hard", "soft"):
        prepared = make([RegionSpec("a fox", left), RegionSpec("a car", right)], mode=mode).prepared
        assert prepared.bias(H, W, 4, True, torch.device("cpu"))[0][1] is False


def test_zero_coverage_and_overlaps_give_no_nan():
    block = JointBlock(DIM, HEADS, "flux")
    empty = torch.zeros(48, 64)
    full = torch.ones(48, 64)
    for mode in ("soft", "hard"):
        joint = make([RegionSpec("nothing yet", empty), RegionSpec("a fox", full), RegionSpec("a car", full * 0.6)],
                     mode=mode)
        txt, out = run(joint, block, image(2), torch.cat([encode("bg"), encode("no")]), layout=(0, 1))
        assert torch.isfinite(txt).all() and torch.isfinite(out).all()


def test_per_sample_masks_match_each_latent_alone():
    block = JointBlock(DIM, HEADS, "sd3")
    left, right = halves()
    masks = torch.stack([left, right])
    joint = make([RegionSpec("a fox", masks)], mode="soft")
    img = image(2)
    _, out = run(joint, block, img, encode("bg").expand(2, -1, -1))
    for i, mask in enumerate((left, right)):
        _, alone = run(make([RegionSpec("a fox", mask)], mode="soft"), block, img[i:i + 1], encode("bg"))
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-6, rtol=0)
    with pytest.raises(PaletteError, match="2 mask sets but the latent batch has 3"):
        run(joint, block, image(3), encode("bg").expand(3, -1, -1), latent=(3, 16, 2 * H, 2 * W))


def test_odd_latent_sizes_pad_to_whole_patches():
    assert token_grid(11, 15, 2) == (6, 8) and token_grid(12, 16, 2) == (6, 8)
    block = JointBlock(DIM, HEADS, "flux")
    joint = make([RegionSpec("a fox", halves()[0])])
    _, odd = run(joint, block, image(), encode("bg"), latent=(1, 16, 11, 15))
    _, even = run(joint, block, image(), encode("bg"))
    torch.testing.assert_close(odd, even)


def test_outside_the_sigma_range_the_background_alone_reads_like_plain():
    block = JointBlock(DIM, HEADS, "flux")
    joint = make([RegionSpec("a fox", halves()[0])], sigma_start=5.0, sigma_end=1.0)
    img = image()
    _, out = run(joint, block, img, encode("bg"), sigmas=torch.tensor([0.5]))
    _, want = block(encode("bg"), img, {})
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    _, inside = run(joint, block, img, encode("bg"), sigmas=torch.tensor([2.0]))
    assert not torch.allclose(inside, want, atol=1e-3)


def test_other_calls_pass_through_and_earlier_overrides_chain():
    seen = []

    def earlier(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    palette = Palette.build([RegionSpec("a fox", halves()[0])], "bg", 64, 48, encode)
    joint = JointRegionalAttention(palette, JointOptions(), patch=2, previous_override=earlier)
    block = JointBlock(DIM, HEADS, "sd3")
    run(joint, block, image(), encode("bg"))
    assert len(seen) == 1
    holder = {"transformer_options": {"optimized_attention_override": earlier}}
    joint.install(holder)
    assert JointRegionalAttention.installed_in(holder) is joint
    to = joint.with_call({**holder["transformer_options"]}, (1, 16, 2 * H, 2 * W), 4, torch.float32, torch.device("cpu"))
    q = torch.randn(1, H * W, DIM)  # an image-only attention (SD3.5's second self-attention)
    out = joint.attention_override(sdpa, q, q, q, HEADS, transformer_options=to)
    torch.testing.assert_close(out, sdpa(q, q, q, HEADS))
    assert to[CALL_KEY]["calls"] == 0 and len(seen) == 2
    joint.uninstall(holder)
    assert holder["transformer_options"]["optimized_attention_override"] is earlier


def test_another_mask_over_the_old_sequence_is_refused():
    joint = make([RegionSpec("a fox", halves()[0])])
    to = joint.with_call({}, (1, 16, 2 * H, 2 * W), 4, torch.float32, torch.device("cpu"))
    length = to[CALL_KEY]["length"]
    q = torch.randn(1, length, DIM)
    with pytest.raises(PaletteError, match="attention mask covers"):
        joint.attention_override(sdpa, q, q, q, HEADS, mask=torch.zeros(1, length - 3, length - 3), transformer_options=to)
    mask = torch.zeros(1, length, length)
    out = joint.attention_override(sdpa, q, q, q, HEADS, mask=mask, transformer_options=to)
    assert torch.isfinite(out).all()


def test_context_of_another_width_is_refused():
    joint = make([RegionSpec("a fox", halves()[0])])
    with pytest.raises(PaletteError, match="encode the palette with the CLIP of the same checkpoint"):
        joint.extend_context(torch.zeros(1, 4, DIM + 1))


def test_joint_bias_checks_its_blocks():
    with pytest.raises(ValueError):
        joint_bias(torch.ones(1, 2, 4), [3])
    with pytest.raises(PaletteError, match="text_sees"):
        JointOptions(text_sees="nowhere")


def test_region_weight_scales_the_joint_text_mass():
    """On joint attention a weight w multiplies the region's coverage in both the share among the
    prompts and the text's weight against the image tokens (the bias gains log w)."""
    half = torch.zeros(48, 64)
    half[:, :32] = 0.5
    plain = make([RegionSpec("a fox", half)]).prepared
    heavy = make([RegionSpec("a fox", half, weight=2.0)]).prepared
    counts = plain.counts(4)
    text = sum(counts)
    a, _ = plain.bias(H, W, 4, True, torch.device("cpu"))[0]
    b, _ = heavy.bias(H, W, 4, True, torch.device("cpu"))[0]
    fox = slice(counts[0], text)
    diff = b[0, text:, fox] - a[0, text:, fox]
    finite = torch.isfinite(a[0, text:, fox])
    torch.testing.assert_close(diff[finite], torch.full_like(diff[finite], float(torch.log(torch.tensor(2.0)))))
    torch.testing.assert_close(b[0, :, :counts[0]], a[0, :, :counts[0]])  # the background is unweighted
    assert torch.equal(b[0, :text], a[0, :text])  # text rows unchanged
