#!/usr/bin/env python3
"""One compiled graph per tick: graph breaks, recompiles and time per UNet call, eager vs
torch.compile, with RCCA per-slot palettes (the stream's tick); prints one JSON object.

For each region count P: the diffusion model (ComfyUI's UNetModel) is called as a stream tick
calls it (S slots, each latent with its own palette, cfg off), with palettes that change every
call (stripes, reversed stripes: masks and prompts differ, one token bucket).
- graph breaks: torch._dynamo.explain of the forward with RCCA's hooks reading their inputs
  lazily (the hooks before the tick path: sigma read, id()-keyed caches, weight versions) and
  with the precomputed tick (the path used now);
- recompiles: torch.compile(fullgraph=True) with a counting backend over `--calls` edited calls;
- time: median ms per call, eager vs inductor (after its warm-up), and inductor's compile time.
ComfyUI's PyTorch attention (SDPA) is selected: its CPU default, sub-quadratic attention, reads
free memory through psutil at every call and breaks any graph, with or without RCCA.

  CPU: .host/venv/bin/python bench/compile_tick.py --threads 1
  GPU: python3 bench/compile_tick.py --device cuda --preset full --size 512   (mode reduce-overhead)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("tiny", "stock", "full"), default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default: 512 on cuda, else 256)")
    ap.add_argument("--slots", type=int, default=4, help="stream slots = latents per call")
    ap.add_argument("--regions", default="0,1,4", help="comma list of region counts P (0: the UNet without RCCA)")
    ap.add_argument("--opacity", type=float, default=0.8,
                    help="region strength: below 1 every pixel mixes a region with the background, as a soft "
                         "brush does, and soft mode normalises there in eager too; at 1 the stripes are hard "
                         "partitions, which eager leaves unnormalised and a compiled model (fixed graph) does not")
    ap.add_argument("--calls", type=int, default=12, help="timed calls per variant (palettes alternate)")
    ap.add_argument("--no-inductor", action="store_true", help="skip the inductor timing (breaks / recompiles only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.preset = a.preset or ("full" if a.device == "cuda" else "tiny")
    a.size = a.size or (512 if a.device == "cuda" else 256)
    a.regions = [int(p) for p in a.regions.split(",") if p.strip()]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    host = common.setup_comfy(a.device, a.comfyui)
    try:
        import comfy.ldm.modules.attention as attention
        from torch._dynamo.testing import CompileCounter

        attention.optimized_attention = attention.attention_pytorch
        name, _ = common.prepare_checkpoint(host, a.preset)
        model, clip = common.load_checkpoint(host, name)
        import comfy.model_management as mm

        mm.load_models_gpu([model])
        dm = model.get_model_object("diffusion_model")
        dtype = model.model.get_dtype() if a.device == "cpu" else torch.float16
        device = torch.device(a.device)
        dm = dm.to(device=device, dtype=dtype)
        latent = a.size // 8
        g = torch.Generator().manual_seed(0)
        x = torch.randn(a.slots, 4, latent, latent, generator=g).to(device, dtype)
        t = torch.linspace(999, 279, a.slots).to(device)
        results = []
        for p in a.regions:
            if p == 0:
                results.append(_unpatched(host, dm, model, clip, x, t, a, device, dtype, CompileCounter))
                continue
            palette, background = host.node("RCCARegionalPromptPalette").execute(
                clip, common.BACKGROUND_PROMPT, a.size, a.size, _chain(host, p, a.size, a.opacity, False)).result[:2]
            reversed_pal = host.node("RCCARegionalPromptPalette").execute(
                clip, common.BACKGROUND_PROMPT, a.size, a.size, _chain(host, p, a.size, a.opacity, True)).result[0]
            patched = common.patch_model(host, model, palette)
            core = sys.modules[type(patched.model_options["transformer_options"]["optimized_attention_override"].__self__).__module__]
            rcca = core.RegionalCrossAttention.installed_in(patched.model_options)
            preps = [rcca.prepare(palette), rcca.prepare(reversed_pal)]
            ctx = background[0][0].to(device, dtype).expand(a.slots, -1, -1)
            base_to = {**patched.model_options["transformer_options"], "cond_or_uncond": [0],
                       "uuids": ["c"], "sigmas": torch.full((a.slots,), 3.0)}

            def rows(i):
                return tuple(preps[(i + s) % 2] for s in range(a.slots))

            def opts(i, static, tick=True):
                to = {**base_to, rcca.ROWS_KEY: rows(i)}
                return rcca.with_tick(to, x.shape, ctx.shape[1], dtype, device, static=static) if tick else to

            entry: dict[str, Any] = {"P": p, "extra_tokens": [q.extra_tokens for q in preps],
                                     "token_bucket": core.token_bucket(max(q.extra_tokens for q in preps))}
            with torch.no_grad():
                torch._dynamo.reset()
                before = torch._dynamo.explain(dm)(x, t, context=ctx, transformer_options=opts(0, False, tick=False))
                torch._dynamo.reset()
                after = torch._dynamo.explain(dm)(x, t, context=ctx, transformer_options=opts(0, True))
                entry["graph_breaks"] = {"lazy_hooks": before.graph_break_count, "tick": after.graph_break_count}
                entry["graphs"] = {"lazy_hooks": before.graph_count, "tick": after.graph_count}
                torch._dynamo.reset()
                cnt = CompileCounter()
                counted = torch.compile(dm, backend=cnt, fullgraph=True, dynamic=False)
                for i in range(a.calls):
                    counted(x, t, context=ctx, transformer_options=opts(i, True))
                entry["compilations_over_edited_calls"] = {"calls": a.calls, "compilations": cnt.frame_count}
                entry["eager_ms"] = _time(lambda i: dm(x, t, context=ctx, transformer_options=opts(i, False)), a.calls, host)
                if not a.no_inductor:
                    torch._dynamo.reset()
                    mode = "reduce-overhead" if a.device == "cuda" else None
                    compiled = torch.compile(dm, backend="inductor", mode=mode, fullgraph=True, dynamic=False)
                    t0 = time.perf_counter()
                    want = dm(x, t, context=ctx, transformer_options=opts(0, False))
                    got = compiled(x, t, context=ctx, transformer_options=opts(0, True))
                    host.sync()
                    entry["inductor_compile_s"] = round(time.perf_counter() - t0, 1)
                    entry["inductor_max_abs_diff_rel"] = float((got.float() - want.float()).abs().max() / want.float().abs().max())
                    compiled(x, t, context=ctx, transformer_options=opts(1, True))
                    entry["compiled_ms"] = _time(lambda i: compiled(x, t, context=ctx, transformer_options=opts(i, True)),
                                                 a.calls, host)
                    entry["speedup"] = common.ratio(entry["eager_ms"], entry["compiled_ms"])
            results.append(entry)
        report = {
            "benchmark": "compile_tick",
            "environment": common.environment(host),
            "preset": a.preset, "size": [a.size, a.size], "slots": a.slots, "opacity": a.opacity, "mode": "soft", "dtype": str(dtype).replace("torch.", ""),
            "attention": "ComfyUI attention_pytorch (SDPA)",
            "metric": "median ms per UNet call over `calls` calls whose per-slot palettes alternate; the tick "
                      "(host preparation) is included in both eager and compiled times",
            "results": results,
        }
        common.emit_report(report, a.out)
    finally:
        host.close()
    return 0


def _unpatched(host, dm, model, clip, x, t, a, device, dtype, CompileCounter) -> dict:
    """P = 0: the UNet without RCCA, the baseline of what compile buys on this machine."""
    ctx = host.nodes.CLIPTextEncode().encode(clip, common.BACKGROUND_PROMPT)[0][0][0].to(device, dtype)
    ctx = ctx.expand(a.slots, -1, -1)
    to = {"cond_or_uncond": [0], "uuids": ["c"], "sigmas": torch.full((a.slots,), 3.0)}
    entry: dict[str, Any] = {"P": 0}
    with torch.no_grad():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(dm)(x, t, context=ctx, transformer_options=dict(to))
        entry["graph_breaks"] = {"unpatched": explained.graph_break_count}
        entry["eager_ms"] = _time(lambda i: dm(x, t, context=ctx, transformer_options=dict(to)), a.calls, host)
        if not a.no_inductor:
            torch._dynamo.reset()
            mode = "reduce-overhead" if a.device == "cuda" else None
            compiled = torch.compile(dm, backend="inductor", mode=mode, fullgraph=True, dynamic=False)
            t0 = time.perf_counter()
            compiled(x, t, context=ctx, transformer_options=dict(to))
            host.sync()
            entry["inductor_compile_s"] = round(time.perf_counter() - t0, 1)
            compiled(x, t, context=ctx, transformer_options=dict(to))
            entry["compiled_ms"] = _time(lambda i: compiled(x, t, context=ctx, transformer_options=dict(to)), a.calls, host)
            entry["speedup"] = common.ratio(entry["eager_ms"], entry["compiled_ms"])
    return entry


def _chain(host, regions, size, opacity, reverse):
    """P stripes at `opacity`; reversed: the stripes in reverse order with other prompts, so every
    mask and prompt differs between the two palettes."""
    add = host.node("RCCAAddRegion")
    chain = None
    masks = common.stripe_masks(regions, size, size)
    for i, mask in enumerate(reversed(masks) if reverse else masks):
        prompt = (f"a {['red', 'green', 'blue', 'white'][i % 4]} house, number {i}" if reverse
                  else common.REGION_PROMPTS[i % len(common.REGION_PROMPTS)] + f", variant {i}")
        chain = add.execute(mask, prompt, opacity, regions=chain).result[0]
    return chain


def _time(call, n, host) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        host.sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


if __name__ == "__main__":
    raise SystemExit(main())
