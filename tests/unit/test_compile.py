"""RCCA under torch.compile(fullgraph=True): the hooks read only the tensors precomputed on the host
for the model call (RegionalCrossAttention.with_tick), so the traced attention has no graph break,
equals eager, and a palette edit within the token bucket reuses the compiled graph."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from fake_unet import run_layer
from rcca_core.attention import TICK_KEY, RegionalCrossAttention, token_bucket
from rcca_core.palette import Palette, RegionSpec
from test_attention import DIM, KEY, encode, halves, make, plain, queries

H, W = 6, 8


def layer_fn(layer):
    def fn(x, context, to):
        return run_layer(layer, x, context, H, W, to)
    return fn


def ticked(rcca, to, x, own, rows=None, sigma=None, static=True):
    """transformer_options for one call, with the tick precomputed on the host (as the APPLY_MODEL wrapper does)."""
    opts = dict(to)
    if rows is not None:
        opts[RegionalCrossAttention.ROWS_KEY] = rows
    if sigma is not None:
        opts["sigmas"] = torch.full((x.shape[0],), sigma)
    return rcca.with_tick(opts, (x.shape[0], DIM, H, W), own.shape[1], x.dtype, x.device, static=static, levels=1)


def palettes(n):
    """n palettes of one bucket: other masks, other prompts (other token counts), one or two regions."""
    left, right = halves()
    ramp = torch.linspace(0, 1, 32).expand(24, 32).contiguous()
    specs = [
        [RegionSpec("a dog", left), RegionSpec("a cat", right)],
        [RegionSpec("a red fox", ramp * 0.6), RegionSpec("a blue car", (1 - ramp) * 0.5, negative="rust")],
        [RegionSpec("an old oak tree", right * 0.8)],
        [RegionSpec("sky", left), RegionSpec("sea", right * 0.3), RegionSpec("sand", left * 0.2)],
    ]
    return [Palette.build(s, "bg", 32, 24, encode) for s in specs[:n]]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_compiled_layer_has_no_graph_break_and_equals_eager(mode):
    layer, palette, rcca, to = make([RegionSpec("a dog", halves()[0] * 0.7), RegionSpec("a cat", halves()[1])],
                                    mode=mode, self_sigma_end=5.0)
    x = queries(2, H, W)
    own = torch.cat([encode("bg"), encode("blurry")])
    opts = {**to, "cond_or_uncond": [0, 1], "sigmas": torch.full((2,), 10.0)}
    want = run_layer(layer, x, own, H, W, opts)  # the eager hooks, no tick
    tick_opts = ticked(rcca, opts, x, own)
    explained = torch._dynamo.explain(layer_fn(layer))(x, own, tick_opts)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    cnt = CompileCounter()
    compiled = torch.compile(layer_fn(layer), backend=cnt, fullgraph=True, dynamic=False)
    with torch.no_grad():
        got = compiled(x, own, tick_opts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cnt.frame_count == 1


def test_palette_edits_within_the_bucket_do_not_recompile():
    """Per-latent palettes (the stream's slots) change every call: masks, prompts, region count,
    a region negative; all within one token bucket. One compilation serves them all, and each
    call equals the eager hooks on the same palettes."""
    layer, _, rcca, to = make([RegionSpec("a dog", torch.ones(24, 32))])
    prepared = [rcca.prepare(p) for p in palettes(4)]
    assert len({token_bucket(p.extra_tokens) for p in prepared}) == 1
    x = queries(4, H, W)  # 2 latents x (cond, uncond)
    own = torch.cat([encode("bg")] * 2 + [encode("blurry")] * 2)
    opts = {**to, "cond_or_uncond": [0, 1]}
    cnt = CompileCounter()
    compiled = torch.compile(layer_fn(layer), backend=cnt, fullgraph=True, dynamic=False)
    combos = [(prepared[0], prepared[1]), (prepared[1], prepared[2]), (prepared[3], prepared[0]), (prepared[2], prepared[2])]
    with torch.no_grad():
        for rows in combos:
            want = run_layer(layer, x, own, H, W, {**opts, RegionalCrossAttention.ROWS_KEY: rows})
            got = compiled(x, own, ticked(rcca, opts, x, own, rows=rows))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cnt.frame_count == 1


def test_sigma_range_and_self_attention_switch_without_recompiling():
    layer, _, rcca, to = make([RegionSpec("a dog", torch.ones(24, 32))], sigma_start=5.0, sigma_end=1.0)
    x = queries(1, H, W)
    own = encode("bg")
    cnt = CompileCounter()
    compiled = torch.compile(layer_fn(layer), backend=cnt, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for sigma, want in ((10.0, "bg"), (3.0, "a dog"), (0.5, "bg")):
            got = compiled(x, own, ticked(rcca, {**to, "cond_or_uncond": [0]}, x, own, sigma=sigma))
            torch.testing.assert_close(got, plain(layer, x, encode(want), H, W), atol=1e-5, rtol=0)
    assert cnt.frame_count == 1


def test_leaving_the_bucket_recompiles_once_and_each_bucket_keeps_its_graph():
    layer, _, rcca, to = make([RegionSpec("a dog", torch.ones(24, 32))])
    small = rcca.prepare(palettes(1)[0])
    many = rcca.prepare(Palette.build([RegionSpec(f"prompt number {i}", torch.ones(24, 32) / 12) for i in range(12)],
                                      "bg", 32, 24, encode))
    assert token_bucket(many.extra_tokens) > token_bucket(small.extra_tokens)
    x, own = queries(1, H, W), encode("bg")
    opts = {**to, "cond_or_uncond": [0]}
    cnt = CompileCounter()
    compiled = torch.compile(layer_fn(layer), backend=cnt, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in ((small,), (many,), (small,), (many,)):
            want = run_layer(layer, x, own, H, W, {**opts, RegionalCrossAttention.ROWS_KEY: rows})
            torch.testing.assert_close(compiled(x, own, ticked(rcca, opts, x, own, rows=rows)), want, atol=1e-5, rtol=0)
    assert cnt.frame_count == 2


def test_eager_tick_path_equals_the_hooks_without_tick():
    """Not static: no padding, mixed-row check on the host; same numbers as the lazy path."""
    layer, _, rcca, to = make([RegionSpec("a dog", halves()[0] * 0.5, negative="ugly"), RegionSpec("a cat", halves()[1])])
    x = queries(2, H, W)
    own = torch.cat([encode("bg"), encode("blurry")])
    opts = {**to, "cond_or_uncond": [0, 1]}
    want = run_layer(layer, x, own, H, W, opts)
    tick_opts = ticked(rcca, opts, x, own, static=False)
    assert tick_opts[TICK_KEY]["kv"][KEY][0].shape[1] == rcca.default.extra_tokens  # unpadded
    torch.testing.assert_close(run_layer(layer, x, own, H, W, tick_opts), want, atol=0, rtol=0)


def test_token_buckets_are_powers_of_two_of_prompt_chunks():
    assert [token_bucket(77 * p) for p in (1, 2, 3, 4, 5, 8, 9, 16)] == [77, 154, 308, 308, 616, 616, 1232, 1232]
    assert token_bucket(10) == 77 and token_bucket(78) == 154
