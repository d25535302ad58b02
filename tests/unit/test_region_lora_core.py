"""rcca_core.region_lora without ComfyUI: a region LoRA's delta on a layer, masked by coverage."""

import pytest
import torch

from rcca_core.palette import PaletteError
from rcca_core.region_lora import LayerDelta, RegionLoRA, RegionalLoRA, add_kv_deltas


def factors(out_ch, in_ch, rank=3, kernel=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_ch, *kernel, generator=g), torch.randn(out_ch, rank, *((1, 1) if kernel else ()), generator=g)


def test_low_rank_equals_the_dense_delta_for_linear_and_conv():
    down, up = factors(6, 5)
    linear = torch.nn.Linear(5, 6)
    x = torch.randn(2, 7, 5)
    dense = (up @ down) * 0.7
    torch.testing.assert_close(LayerDelta(down=down, up=up, scale=0.7).apply(linear, x), x @ dense.T)
    torch.testing.assert_close(LayerDelta(weight=dense).apply(linear, x), x @ dense.T)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    down, up = factors(6, 4, kernel=(3, 3))
    dense = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * 0.5
    x = torch.randn(1, 4, 9, 9)
    want = torch.nn.functional.conv2d(x, dense, None, 2, 1)
    torch.testing.assert_close(LayerDelta(down=down, up=up, scale=0.5).apply(conv, x), want, atol=1e-5, rtol=1e-5)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.proj = torch.nn.Linear(3, 3)
        self.emb = torch.nn.Linear(3, 3)


def test_hooks_scale_the_delta_by_coverage_and_are_removed():
    torch.manual_seed(0)
    model = Tiny()
    deltas = {name: LayerDelta(weight=torch.randn(3, 3, *((1, 1) if name == "conv" else ()))) for name in ("conv", "proj", "emb")}
    lora = RegionLoRA("style", 1.0, {})
    regional = RegionalLoRA(lambda l: deltas, {})
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    x_img = torch.randn(2, 3, 8, 8)  # 2 chunks (cond, uncond) of one latent
    x_tok = torch.randn(2, 64, 3)
    x_vec = torch.randn(2, 3)
    plain = (model.conv(x_img), model.proj(x_tok), model.emb(x_vec))
    handles = regional.install(model, [[(lora, left)]], 2, (8, 8))
    got = (model.conv(x_img), model.proj(x_tok), model.emb(x_vec))
    for h in handles:
        h.remove()
    d_conv = deltas["conv"].apply(model.conv, x_img)
    torch.testing.assert_close(got[0][..., :4], plain[0][..., :4] + d_conv[..., :4])  # painted: W + D
    torch.testing.assert_close(got[0][..., 4:], plain[0][..., 4:])  # unpainted: W
    tokens = got[1].reshape(2, 8, 8, 3)
    torch.testing.assert_close(tokens[:, :, 4:], plain[1].reshape(2, 8, 8, 3)[:, :, 4:])
    torch.testing.assert_close(got[2], plain[2] + 0.5 * deltas["emb"].apply(model.emb, x_vec))  # mean coverage
    torch.testing.assert_close(model.conv(x_img), plain[0])  # hooks gone
    with pytest.raises(PaletteError, match="matches no resolution"):
        handles = regional.install(model, [[(lora, left)]], 1, (8, 8))
        try:
            model.proj(torch.randn(1, 10, 3))
        finally:
            for h in handles:
                h.remove()


def test_kv_deltas_touch_only_their_regions_tokens():
    to_k, to_v = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ctx = torch.randn(1, 10, 4)
    k, v = to_k(ctx), to_v(ctx)
    dk = LayerDelta(weight=torch.randn(4, 4))
    k2, v2 = add_kv_deltas(k, v, ctx, [(3, 6)], [(dk, None)], to_k, to_v)
    torch.testing.assert_close(k2[:, 3:6], k[:, 3:6] + dk.apply(to_k, ctx[:, 3:6]))
    assert torch.equal(k2[:, :3], k[:, :3]) and torch.equal(k2[:, 6:], k[:, 6:]) and torch.equal(v2, v)
    with pytest.raises(PaletteError, match="strength must be a finite number"):
        RegionLoRA("bad", float("nan"), {})
