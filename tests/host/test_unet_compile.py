"""RCCA in a compiled UNet on the real host (tiny SD1.5, CPU): torch.compile(fullgraph=True) of
ComfyUI's UNetModel with the patch installed traces in one graph (no break), equals eager, and
palette edits within the token bucket (the stream's per-slot palettes) reuse it.

ComfyUI's CPU default attention (sub-quadratic) asks psutil for free memory at every call, which
dynamo cannot trace with or without RCCA; these tests select ComfyUI's PyTorch attention (SDPA,
the GPU default, `--use-pytorch-cross-attention`)."""


import pytest
import torch
from torch._dynamo.testing import CompileCounter

from test_rcca_nodes import SIZE, build_palette, encode, halves, node, patch, sample

LATENT = 32  # the UNet's input (256 px canvas, 1/8 scale)


@pytest.fixture
def sdpa_attention(comfy_host, monkeypatch):
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def palettes(host):
    """Three palettes of one token bucket (3 or 4 prompt chunks of 77 tokens: 308 tokens): other
    prompts, masks, region counts, a region negative."""
    left, right = halves()
    ramp = torch.linspace(0, 1, SIZE).expand(1, SIZE, SIZE).contiguous()
    specs = [
        [("a red fox", left), ("a blue car", right), ("a cloud", left * 0.3)],
        [("a tall lighthouse at night", ramp * 0.6), ("a boat", (1 - ramp) * 0.4, {"negative": "rust"})],
        [("an oak tree", right * 0.8), ("a bench", left * 0.5), ("a dog", left * 0.2), ("a kite", right * 0.1)],
    ]
    return [build_palette(host, s)[0] for s in specs]


def unet_inputs(host, batch_latents=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch_latents, 4, LATENT, LATENT, generator=g)
    ctx = torch.cat([encode(host, "a meadow")[0][0]] * batch_latents + [encode(host, "blurry")[0][0]] * batch_latents)
    t = torch.full((2 * batch_latents,), 500.0)
    return x, t, ctx


def rcca_of(host, model, pal):
    patched = patch(host, model, pal)
    core = host.pack_module("rcca_core.attention")
    return patched, core.RegionalCrossAttention.installed_in(patched.model_options), core


def options_for(rcca, patched, x, ctx, rows=None, static=True):
    to = {**patched.model_options["transformer_options"], "cond_or_uncond": [0, 1], "uuids": ["c", "u"],
          "sigmas": torch.full((x.shape[0],), 3.0)}
    if rows is not None:
        to[rcca.ROWS_KEY] = rows
    return rcca.with_tick(to, x.shape, ctx.shape[1], x.dtype, x.device, static=static)


def test_unet_with_rcca_compiles_to_one_graph_and_equals_eager(comfy_host, sdpa_attention):
    model, _, _ = comfy_host.load_tiny()
    pal = palettes(comfy_host)[1]  # soft masks with a region negative: the normalisation runs
    patched, rcca, _ = rcca_of(comfy_host, model, pal)
    dm = patched.get_model_object("diffusion_model")
    x, t, ctx = unet_inputs(comfy_host, 1)
    with torch.no_grad():
        eager = dm(x, t, context=ctx, transformer_options=options_for(rcca, patched, x, ctx, static=False))
        plain = dm(x, t, context=ctx, transformer_options={"cond_or_uncond": [0, 1], "uuids": ["c", "u"]})
        to = options_for(rcca, patched, x, ctx)
        explained = torch._dynamo.explain(dm)(x, t, context=ctx, transformer_options=to)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        torch._dynamo.reset()
        cnt = CompileCounter()
        compiled = torch.compile(dm, backend=cnt, fullgraph=True, dynamic=False)
        got = compiled(x, t, context=ctx, transformer_options=to)
    scale = float(eager.abs().max())
    torch.testing.assert_close(got, eager, atol=1e-5 * scale, rtol=0)
    assert float((eager - plain).abs().max()) > 1e-2 * scale  # RCCA acted inside the compiled graph
    assert cnt.frame_count == 1


def test_per_slot_palette_edits_reuse_the_compiled_unet(comfy_host, sdpa_attention):
    """The stream's case: every latent has its own palette (rcca_rows) and they change from call to
    call (masks, prompts, region count, a region negative); one compilation serves every call."""
    model, _, _ = comfy_host.load_tiny()
    pals = palettes(comfy_host)
    patched, rcca, _ = rcca_of(comfy_host, model, pals[0])
    prepared = [rcca.prepare(p) for p in pals]
    dm = patched.get_model_object("diffusion_model")
    x, t, ctx = unet_inputs(comfy_host, 2)
    cnt = CompileCounter()
    compiled = torch.compile(dm, backend=cnt, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for rows in ((prepared[0], prepared[1]), (prepared[2], prepared[0]), (prepared[1], prepared[1])):
            want = dm(x, t, context=ctx, transformer_options=options_for(rcca, patched, x, ctx, rows, static=False))
            got = compiled(x, t, context=ctx, transformer_options=options_for(rcca, patched, x, ctx, rows))
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert cnt.frame_count == 1


def test_ksampler_with_comfyui_compile_wrapper_is_one_graph(comfy_host, sdpa_attention):
    """The core KSampler through ComfyUI's own torch.compile wrapper (as its TorchCompileModel node
    sets it) with fullgraph=True: every step and both CFG rows run one graph, equal to eager; an
    edited palette (a new patch node run: other prompts and masks, same bucket) reuses it."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model, _, _ = comfy_host.load_tiny()
    pal, background = build_palette(comfy_host, [("a red fox", halves()[0] * 0.6), ("a blue car", halves()[1])])[:2]
    patched = patch(comfy_host, model, pal)
    negative = encode(comfy_host, "blurry")
    want = sample(comfy_host, patched, background, negative, cfg=2.0, width=LATENT * 8, height=LATENT * 8)
    compiled = patched.clone()
    rcca = comfy_host.pack_module("rcca_core.attention").RegionalCrossAttention.installed_in(compiled.model_options)
    statics, inputs = [], rcca.tick_inputs
    rcca.tick_inputs = lambda *a: statics.append(a[5]) or inputs(*a)  # the wrapper saw ComfyUI's compile wrapper
    cnt = CompileCounter()
    set_torch_compile_wrapper(compiled, backend=cnt, fullgraph=True, dynamic=False)
    got = sample(comfy_host, compiled, background, negative, cfg=2.0, width=LATENT * 8, height=LATENT * 8)
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    assert cnt.frame_count == 1
    assert statics and all(statics)  # fixed shapes (padded to the bucket) under ComfyUI's compile wrapper
    edited = patch(comfy_host, model, build_palette(comfy_host, [("a tall lighthouse at night", halves()[1] * 0.8),
                                                                 ("a boat", halves()[0] * 0.5)])[0])
    want = sample(comfy_host, edited, background, negative, cfg=2.0, width=LATENT * 8, height=LATENT * 8)
    edited = edited.clone()
    set_torch_compile_wrapper(edited, backend=cnt, fullgraph=True, dynamic=False)
    got = sample(comfy_host, edited, background, negative, cfg=2.0, width=LATENT * 8, height=LATENT * 8)
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
    assert cnt.frame_count == 1


def test_stream_compile_option_is_one_graph_across_palette_edits(comfy_host, sdpa_attention, monkeypatch):
    """The Stream Batch LCM Sampler with compile = torch.compile (fullgraph, a counting backend in place
    of inductor): a timeline whose states differ in prompts, masks and region count (3 and 4 regions: one bucket)
    streams through one compiled graph, every tick, and gives the eager stream's frames."""
    import test_stream_node as ts

    runtime = comfy_host.pack_module("nodes.stream_runtime").StreamRuntime
    cnt = CompileCounter()
    monkeypatch.setattr(runtime, "compile_backend", cnt)
    monkeypatch.setattr(runtime, "compile_fullgraph", True)
    left, right = ts.halves()
    pal_a, background, _ = ts.palette(comfy_host, ["a red fox", "a blue car", "a cloud"], [left, right, left * 0.3])
    pal_b, _, _ = ts.palette(comfy_host, ["a green frog in a pond", "a stone", "a boat", "a kite"],
                             [right * 0.7, left, left * 0.2, right * 0.2])
    pal_c, _, _ = ts.palette(comfy_host, ["a cat", "a dog", "a bird"], [left * 0.5, right, left * 0.4])
    timeline = ts.timeline_of(comfy_host, (pal_a, 2), (pal_b, 2), (pal_c, 2))
    model = comfy_host.load_tiny()[0]
    latent = comfy_host.nodes.EmptyLatentImage().generate(ts.SIZE, ts.SIZE, 6)[0]
    sampler = node(comfy_host, "RCCAStreamBatchLCMSampler")
    outs = {}
    for mode in ("eager", "torch.compile"):
        outs[mode] = sampler.execute(model, background, ts.encode(comfy_host, "blurry"), latent, ts.TIMESTEPS, 50, 11,
                                     "rcca", "full", 2.0, mode, "latent2rgb", timeline=timeline).result[0]["samples"]
    ts.assert_frames_close(outs["torch.compile"], outs["eager"])
    assert (outs["eager"][1] - outs["eager"][2]).abs().max() > 1e-3  # the edits reached the frames
    assert cnt.frame_count == 1
