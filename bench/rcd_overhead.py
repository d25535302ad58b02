#!/usr/bin/env python3
"""RCD overhead: time and peak memory of RCD sampling vs plain sampling (same steps); prints one JSON object.

One process, one checkpoint, one latent and seed. For N = 2 and 3 subjects the positive is the
RCD Embedding Refiner's output for an N-subject prompt (the same conditioning for both variants);
the sampler is SamplerCustomAdvanced + CFGGuider with the base sampler (euler) alone ("plain"),
or wrapped by the RCD Latent Optimizer ("rcd"). RCD is timed cold (teacher cache emptied, so the
N single-subject teacher runs are included) and warm (teachers from the cache, as on a second
run with the same prompt and seed). Runs are interleaved, repeated, and the median whole-run
time is reported; ratios are rcd / plain.

Peak memory: on CUDA, torch.cuda.max_memory_allocated() over the run (weights included; the
target counts everything); on CPU, the peak of torch's tensor memory above the run's start, from
the profiler's allocation records in one extra untimed run per variant (weights not included).

Defaults follow the paper on a GPU (T = 50 steps, t_f = 25, t_A = 15, k = 1, s = 10, cfg 7.5, full
SD1.5 UNet, 512 x 512, fp16); on CPU a tiny model with the schedule scaled down (T = 10, t_f = 5,
t_A = 3, 128 x 128). The target (<= 2.5 x plain time, <= 10 GB peak) is for the GPU setting.

  CPU:  .host/venv/bin/python bench/rcd_overhead.py
  GPU:  python3 bench/rcd_overhead.py --device cuda       (full preset; see bench/gpu_run.sh for a bare machine)
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_MAX_RATIO = 2.5
TARGET_MAX_PEAK_GB = 10.0
PROMPTS = {  # exactly 2 and 3 subjects for the rule-based parser
    2: "a black kitten and a white dog",
    3: "a black kitten, a white dog and a red ball",
}
NEGATIVE = "blurry, low quality"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("tiny", "stock", "full"), default=None,
                    help="random checkpoint layout (default: tiny on cpu, full on cuda)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: 512 on cuda, else 128)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps T (default: cuda 50, cpu 10)")
    ap.add_argument("--t-f", type=int, default=None, help="optimised steps t_f (default: T / 2)")
    ap.add_argument("--t-a", type=int, default=None, help="attention control until t_A (default: 0.3 T)")
    ap.add_argument("--k", type=int, default=1, help="gradient steps per optimised step")
    ap.add_argument("--step-size", type=float, default=10.0, help="s in the DDPM latent scale")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--subjects", default="2,3", help="comma list of subject counts (2, 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: cuda 3, cpu 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--no-distill", action="store_true", help="attention control only (no teacher runs)")
    ap.add_argument("--ckpt", default=None, help="checkpoint file (written from the preset if missing)")
    common.add_run_args(ap)
    a = ap.parse_args(argv)
    on_gpu = a.device == "cuda"
    a.preset = a.preset or ("full" if on_gpu else "tiny")
    a.size = a.size or (512 if (on_gpu or a.preset == "full") else 128)
    a.steps = a.steps or (50 if on_gpu else 10)
    a.t_f = a.steps // 2 if a.t_f is None else a.t_f
    a.t_a = round(0.3 * a.steps) if a.t_a is None else a.t_a
    a.repeats = a.repeats or 3
    a.subjects = [int(n) for n in a.subjects.split(",") if n.strip()]
    if any(n not in PROMPTS for n in a.subjects):
        ap.error(f"--subjects: choose among {sorted(PROMPTS)}")
    if a.size % 8 or a.size < 64 or a.steps < 2 or a.repeats < 1:
        ap.error("need --size a multiple of 8 (>= 64), --steps >= 2, --repeats >= 1")
    return a


def rcd_module(host: common.Host):
    """nodes/rcd.py of the pack as ComfyUI loaded it (the pack's own module names)."""
    init = (common.PACK_DIR / "nodes" / "__init__.py").resolve()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == init:
            return importlib.import_module(name + ".rcd")
    raise SystemExit("the pack's nodes package is not loaded")


def cpu_peak_mb(fn) -> float:
    """Peak of torch's CPU tensor memory above the start while fn() runs, from the profiler's
    allocation records (allocations at op start, frees as [memory] events). Profiling slows the
    run, so this is a separate, untimed run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    host = common.setup_comfy(a.device, a.comfyui)
    try:
        rcd = rcd_module(host)
        nodes = host.nodes
        import comfy_extras.nodes_custom_sampler as custom  # SamplerCustomAdvanced & co. (not registered here)
        custom_nodes = {"BasicScheduler": custom.BasicScheduler, "RandomNoise": custom.RandomNoise,
                        "KSamplerSelect": custom.KSamplerSelect, "CFGGuider": custom.CFGGuider,
                        "SamplerCustomAdvanced": custom.SamplerCustomAdvanced}
        node = custom_nodes.__getitem__
        name, write_s = common.prepare_checkpoint(host, a.preset, a.ckpt)
        t_load = time.perf_counter()
        with torch.inference_mode():  # as a workflow would: the weights are inference tensors
            model, clip, _vae = common.load_checkpoint_with_vae(host, name)
            negative = nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0]
            sigmas = node("BasicScheduler").execute(model, "normal", a.steps, 1.0).result[0]
            noise = node("RandomNoise").execute(a.seed).result[0]
            latent = nodes.EmptyLatentImage().generate(a.size, a.size, 1)[0]
            base = node("KSamplerSelect").execute("euler").result[0]
        options = rcd.build_options(t_f=a.t_f, t_a=a.t_a, k=a.k, step_size=a.step_size, delta=1.5,
                                    distill=not a.no_distill)
        sampler = rcd.RCDSampler(base, options)
        cache = sampler.rcd.cache

        def sample(guider, smp):
            with torch.inference_mode():
                return node("SamplerCustomAdvanced").execute(noise, guider, smp, sigmas, latent).result[0]["samples"]

        def run(guider, smp, cold: bool) -> tuple[float, float | None, torch.Tensor]:
            if cold:
                cache.clear()
            host.sync()
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = sample(guider, smp)
            host.sync()
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if a.device == "cuda" else None
            return dt, peak, out

        results = []
        finite, differs = True, True
        t_bench = time.perf_counter()
        for n in a.subjects:
            with torch.inference_mode():
                positive = rcd.RCDEmbeddingRefiner.execute(clip, PROMPTS[n], "", "rules", 0.5).result[0]
                guider = node("CFGGuider").execute(model, positive, negative, a.cfg).result[0]
            found = len(positive[0][1]["rcd_subjects"])
            variants = {"plain": (base, False), "rcd_cold": (sampler, True), "rcd_warm": (sampler, False)}
            times: dict[str, list[float]] = {k: [] for k in variants}
            peaks: dict[str, list[float]] = {k: [] for k in variants}
            samples: dict[str, torch.Tensor] = {}
            status: dict[str, str] = {}
            for r in range(a.warmup + a.repeats):
                order = list(variants)  # rotated from round to round; round 0 fills the cache before rcd_warm
                order = order[r % 3:] + order[:r % 3]
                for k in order:
                    smp, cold = variants[k]
                    dt, peak, out = run(guider, smp, cold)
                    samples[k] = out
                    if k != "plain":
                        status[k] = sampler.rcd.last_run.teacher_status
                    if r >= a.warmup:
                        times[k].append(dt)
                        if peak is not None:
                            peaks[k].append(peak)
            if a.device != "cuda":  # one profiled (untimed) run per variant
                for k, (smp, cold) in variants.items():
                    if cold:
                        cache.clear()
                    peaks[k] = [cpu_peak_mb(lambda: sample(guider, smp))]
            finite = finite and all(bool(torch.isfinite(s).all()) for s in samples.values())
            differs = differs and not torch.equal(samples["rcd_cold"], samples["plain"])
            med = {k: statistics.median(v) for k, v in times.items()}
            pk = {k: max(v) for k, v in peaks.items()}
            results.append({
                "subjects": found,
                "prompt": PROMPTS[n],
                "run_ms": {k: round(1e3 * v, 1) for k, v in med.items()},
                "peak_mb": {k: round(v, 1) for k, v in pk.items()},
                "time_ratio": {k: common.ratio(med[k], med["plain"]) for k in ("rcd_cold", "rcd_warm")},
                "peak_ratio": {k: common.ratio(pk[k], pk["plain"]) for k in ("rcd_cold", "rcd_warm")},
                "teacher_cache": status,
                "optimised_steps": len(sampler.rcd.last_run.records),
            })
        t_end = time.perf_counter()
        meaningful = a.device == "cuda" and a.preset == "full" and a.size == 512
        worst_time = max(r["time_ratio"]["rcd_cold"] for r in results)
        worst_peak_gb = max(r["peak_mb"]["rcd_cold"] for r in results) / 1024
        report = {
            "benchmark": "rcd_overhead",
            "environment": common.environment(host),
            "preset": a.preset,
            "unet_dtype": str(model.model.get_dtype()).replace("torch.", ""),
            "size": [a.size, a.size],
            "sampler": "euler (SamplerCustomAdvanced + CFGGuider)",
            "scheduler": "normal",
            "cfg": a.cfg,
            "steps": a.steps,
            "rcd": {"t_f": a.t_f, "t_a": a.t_a, "k": a.k, "step_size": a.step_size, "delta": 1.5,
                    "distill": not a.no_distill},
            "repeats": a.repeats,
            "warmup": a.warmup,
            "metric": ("run_ms: median whole SamplerCustomAdvanced call (device synchronised); rcd_cold includes the "
                       "teacher runs (cache emptied first), rcd_warm reuses cached teachers. peak_mb: "
                       + ("torch.cuda.max_memory_allocated over the run (weights included)" if a.device == "cuda"
                          else "peak CPU tensor memory above the run's start (profiler allocation records, one "
                               "untimed run; weights excluded)")),
            "results": results,
            "target": {
                "max_time_ratio": TARGET_MAX_RATIO,
                "max_peak_gb": TARGET_MAX_PEAK_GB,
                "worst_time_ratio_cold": worst_time,
                "worst_peak_gb_cold": round(worst_peak_gb, 3) if a.device == "cuda" else None,
                "met": (worst_time <= TARGET_MAX_RATIO and worst_peak_gb <= TARGET_MAX_PEAK_GB) if meaningful else None,
                "meaningful": meaningful,
                "note": ("target is for the full SD1.5 UNet at 512 x 512 fp16 on a GPU"
                         + ("" if meaningful else "; this run is not that, so it says nothing about the target")),
            },
            "sanity": {"all_finite": finite, "rcd_output_differs": differs},
            "seconds": {
                "checkpoint_write": round(write_s, 2),
                "load_and_encode": round(t_bench - t_load, 2),
                "timed_section": round(t_end - t_bench, 2),
                "total": round(t_end - t_start, 2),
            },
        }
    finally:
        host.close()
    common.emit_report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
