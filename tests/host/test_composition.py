"""RCCA next to other regional packs, emulated by small patches in ComfyUI's own hook protocol:
attention couples that add prompt rows to the batch inside attn2 (with and without keeping
cond_or_uncond in step, as Acly's tooling nodes and laksjdjf's attention couple do), and an
attn2_replace that ignores attention overrides (as DenseDiffusion's does). Both orders, cfg 1
and 5. RCCA is either active (moving its region changes the image there) or refuses loudly."""

import pytest
import torch
import torch.nn.functional as F

from test_rcca_nodes import build_palette, encode, node, patch, sample

SIZE = 128


def quarter(top: bool) -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE)
    rows = slice(0, SIZE // 2) if top else slice(SIZE // 2, SIZE)
    mask[:, rows, : SIZE // 2] = 1
    return mask


def with_couple(host, model, prompts, keep_list_in_step):
    """An attention couple: prompts[0] as its background on the left half, the others in horizontal
    bands of the right half. Each cond chunk becomes one chunk per prompt inside attn2;
    the output patch folds them back under the masks."""
    contexts = [encode(host, p)[0][0] for p in prompts]
    masks = torch.zeros(len(prompts), 1, SIZE, SIZE)
    masks[0, :, :, : SIZE // 2] = 1
    bands = torch.linspace(0, SIZE, len(prompts)).long()
    for i in range(1, len(prompts)):
        masks[i, :, bands[i - 1]:bands[i], SIZE // 2:] = 1
    state = {}

    def attn2_patch(n, context, value, extra):
        cu = extra["cond_or_uncond"]
        b = n.shape[0] // len(cu)
        state["b"], state["kinds"] = b, list(cu)
        ns, cs = [], []
        for i, kind in enumerate(list(cu)):
            if kind == 1:
                ns.append(n[i * b:(i + 1) * b]), cs.append(context[i * b:(i + 1) * b])
            else:
                ns += [n[i * b:(i + 1) * b]] * len(contexts)
                cs += [c.to(context).expand(b, -1, -1) for c in contexts]
        if keep_list_in_step:
            cu[:] = [k for kind in state["kinds"] for k in ([1] if kind == 1 else [0] * len(contexts))]
        ctx = torch.cat(cs)
        return torch.cat(ns), ctx, ctx

    def attn2_output_patch(out, extra):
        _, _, h, w = extra["activations_shape"]
        b = state["b"]
        m = F.interpolate(masks, size=(h, w), mode="nearest").flatten(1).unsqueeze(-1).to(out)  # (R, hw, 1)
        parts, pos = [], 0
        for kind in state["kinds"]:
            if kind == 1:
                parts.append(out[pos:pos + b])
                pos += b
            else:
                rows = out[pos:pos + b * len(contexts)].view(len(contexts), b, *out.shape[1:])
                parts.append((rows * m.unsqueeze(1)).sum(0))
                pos += b * len(contexts)
        if keep_list_in_step:
            extra["cond_or_uncond"][:] = state["kinds"]
        return torch.cat(parts)

    m = model.clone()
    m.set_model_attn2_patch(attn2_patch)
    m.set_model_attn2_output_patch(attn2_output_patch)
    return m


def with_replaced_attn2(host, model):
    """attn2_replace on every cross-attention layer, computing plain attention itself (no override)."""
    layers = host.pack_module("rcca_core").attention.cross_attention_layers(model.get_model_object("diffusion_model"))

    def replace(q, k, v, extra):
        heads = extra["n_heads"]
        b, n, inner = q.shape
        split = [t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)

    m = model.clone()
    for kind, block, index in layers:
        m.set_model_attn2_replace(replace, kind, block, index)
    return m


def rcca_and_peer(host, region_mask, peer, rcca_first):
    model = host.load_tiny()[0]
    palette, background, _ = build_palette(host, [("a red fox", region_mask)], width=SIZE, height=SIZE)
    if rcca_first:
        return peer(patch(host, model, palette)), background
    return patch(host, peer(model), palette), background


COUPLES = {  # the couple's background prompt first, then its regions
    "in step, 1 couple region": (["a stone wall", "a blue car"], True),
    "in step, 2 couple regions": (["a stone wall", "a blue car", "a green tree"], True),
    "list not updated, 1 couple region": (["a stone wall", "a blue car"], False),
    "list not updated, 2 couple regions": (["a stone wall", "a blue car", "a green tree"], False),
}


@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("rcca_first", [True, False], ids=["rcca_then_couple", "couple_then_rcca"])
@pytest.mark.parametrize("couple", list(COUPLES))
def test_rcca_is_active_with_an_attention_couple_or_refuses(comfy_host, couple, rcca_first, cfg):
    prompts, in_step = COUPLES[couple]
    peer = lambda m: with_couple(comfy_host, m, prompts, in_step)  # noqa: E731
    negative = encode(comfy_host, "blurry")
    runs = []
    for top in (True, False):
        model, background = rcca_and_peer(comfy_host, quarter(top), peer, rcca_first)
        if not in_step and cfg > 1:
            with pytest.raises(ValueError, match=r"without updating transformer_options\['cond_or_uncond'\]"):
                sample(comfy_host, model, background, negative, cfg=cfg, steps=2, width=SIZE, height=SIZE)
            return
        runs.append(sample(comfy_host, model, background, negative, cfg=cfg, steps=2, width=SIZE, height=SIZE))
    top, bottom = runs
    assert torch.isfinite(top).all() and torch.isfinite(bottom).all()
    half = SIZE // 16  # latent cells
    moved = (top - bottom)[..., : half]  # left half, where RCCA's region moved
    assert moved[..., :half, :].abs().mean() > 1e-2 and moved[..., half:, :].abs().mean() > 1e-2
    couple_alone = sample(comfy_host, peer(comfy_host.load_tiny()[0]), background, negative, cfg=cfg, steps=2,
                          width=SIZE, height=SIZE)
    assert (top - couple_alone).abs().max() > 1e-2  # not silently off


@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("rcca_first", [True, False], ids=["rcca_then_replace", "replace_then_rcca"])
def test_an_attn2_replace_that_ignores_rcca_stops_sampling_with_a_clear_error(comfy_host, rcca_first, cfg):
    model, background = rcca_and_peer(comfy_host, quarter(True), lambda m: with_replaced_attn2(comfy_host, m), rcca_first)
    with pytest.raises(ValueError, match=r"cannot act at cross-attention layer \('input', 1, 0\).*attn2_replace"):
        comfy_host.nodes.KSampler().sample(model, 1, 2, cfg, "lcm", "sgm_uniform", background,
                                           encode(comfy_host, "blurry"),
                                           comfy_host.nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0],
                                           denoise=1.0)


def test_a_second_rcca_patch_in_a_chain_is_refused(comfy_host):
    model = comfy_host.load_tiny()[0]
    first, _, _ = build_palette(comfy_host, [("a red fox", quarter(True))], width=SIZE, height=SIZE)
    second, _, _ = build_palette(comfy_host, [("a blue car", quarter(False))], width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="already carries an RCCA Attention Patch .* one palette"):
        patch(comfy_host, patch(comfy_host, model, first), second)


def test_blocks_the_model_does_not_have_are_refused(comfy_host):
    model = comfy_host.load_tiny()[0]
    palette, _, _ = build_palette(comfy_host, [("a red fox", quarter(True))], width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match=r"'input:99' but this model has no such cross-attention block; it has input:1"):
        patch(comfy_host, model, palette, blocks="input:99")
    patch(comfy_host, model, palette, blocks="input:1, output")  # blocks it has are accepted


def test_a_latent_of_another_aspect_ratio_is_refused_in_pixels_before_the_first_step(comfy_host):
    model = comfy_host.load_tiny()[0]
    palette, background, _ = build_palette(comfy_host, [("a red fox", quarter(True))], width=SIZE, height=SIZE)
    patched = patch(comfy_host, model, palette)
    steps = []
    patched.model_options["transformer_options"].setdefault("patches", {}).setdefault("input_block_patch", []).append(
        lambda h, extra: steps.append(1) or h)
    with pytest.raises(ValueError, match=r"RCCA Attention Patch: the latent \(256 x 128 px\) does not have the palette "
                                         r"canvas's aspect ratio \(128 x 128 px\)"):
        sample(comfy_host, patched, background, encode(comfy_host, "blurry"), width=2 * SIZE, height=SIZE)
    assert not steps  # refused before the model ran
