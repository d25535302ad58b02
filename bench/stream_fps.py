#!/usr/bin/env python3
"""Stream Batch LCM Sampler frames/s and ms/frame: RCCA vs SemanticDraw vs no regions, for P regions.

Calls the RCCAStreamBatchLCMSampler node in process (see bench/common.py) with a palette of P
vertical-stripe regions, on each timestep list, eager and (with --compile) torch.compile, and
prints one JSON object. Steady state only: the figure is the time per tick once the pipe is
full (one model call, one finished frame), plus two whole-call cross-checks (see README).

  CPU (default: tiny preset, 256 x 256):   .host/venv/bin/python bench/stream_fps.py
  GPU (full SD1.5 UNet, 512 x 512, fp16):  bash bench/gpu_run.sh stream
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NODE = "RCCAStreamBatchLCMSampler"
DEFAULT_TIMESTEPS = "0, 12, 24, 36"  # the node's 4-step default (rcca_core.stream.DEFAULT_LCM_INDICES)
SEMANTIC_DRAW_TIMESTEPS = "0, 4, 12, 25, 37"  # SemanticDraw's t_index_list: the like-with-like comparison
MODES = ("rcca", "semantic_draw", "none")

# targets (issue): full SD1.5, 512 x 512, fp16, 4 steps, H100 class
TARGET_P = 4
TARGET_FPS_COMPILED = 40.0
TARGET_FPS_EAGER = 25.0
TARGET_SCALING = 0.85  # fps(P = 8) / fps(P = 1)


@dataclass(frozen=True)
class Variant:
    """One configuration of the node; everything else (model, seed, latent size) is shared."""
    mode: str          # region_mode
    regions: int       # P (0 for mode "none": it gets no palette)
    compiled: bool     # compile "torch.compile" instead of "eager"
    decode: str = "latent2rgb"

    @property
    def key(self) -> str:
        parts = [self.mode] + ([f"P{self.regions}"] if self.mode != "none" else [])
        parts.append("compile" if self.compiled else "eager")
        if self.decode != "latent2rgb":
            parts.append(self.decode)
        return "/".join(parts)

    def rows_per_tick(self, steps: int) -> int:
        """Latent rows in one full tick: SemanticDraw runs the background and every region prompt per step."""
        return steps * (1 + self.regions) if self.mode == "semantic_draw" else steps


@dataclass
class Run:
    frames: int
    call_s: float             # the whole node call, device synchronised at both ends
    tick_s: list[float]       # intervals of the full ticks (S rows, one frame out)
    samples: torch.Tensor
    graphs: int               # torch._dynamo graphs compiled during this call


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("tiny", "stock", "full"), default=None,
                    help="random checkpoint layout (default: tiny on cpu, full on cuda)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=None,
                    help="image width = height in pixels (default: 512 for full or on cuda, else 256)")
    ap.add_argument("--frames", type=int, default=None, help="frames F of the long timed run (default: cpu 6, cuda 24)")
    ap.add_argument("--frames-short", type=int, default=None,
                    help="frames F2 of the short run; (t(F) - t(F2)) / (F - F2) drops per-call costs (default: cpu 2, cuda 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed (F, F2) pairs per variant (default: cpu 2, cuda 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed F2-frame runs per variant first")
    ap.add_argument("--regions", default="1,2,4,8", help="comma list of region counts P")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of region modes to run")
    ap.add_argument("--timesteps", default=f"{DEFAULT_TIMESTEPS}; {SEMANTIC_DRAW_TIMESTEPS}",
                    help="';'-separated timestep lists (indices of the schedule), each run separately")
    ap.add_argument("--schedule-steps", type=int, default=50)
    ap.add_argument("--cfg-mode", choices=("none", "self", "full"), default="none")
    ap.add_argument("--cfg", type=float, default=1.5, help="scale for --cfg-mode self / full")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="also time torch.compile variants (CUDA graphs on cuda); slow to compile, off by default")
    ap.add_argument("--compile-regions", default=str(TARGET_P),
                    help="P values that get a compiled rcca and semantic_draw variant (each costs a compilation); "
                         "'none' always gets one")
    ap.add_argument("--compile-timesteps", choices=("default", "all"), default="default",
                    help="timestep lists with compiled variants: the 4-step default (the targets') or all")
    ap.add_argument("--compile-repeats", type=int, default=None,
                    help="timed pairs per compiled variant (default: --repeats)")
    ap.add_argument("--no-vae-decode", action="store_true",
                    help="skip the run that decodes with the checkpoint's TAESD instead of latent2rgb")
    ap.add_argument("--ckpt", default=None,
                    help="checkpoint file to use; written from the preset there if missing (default: temp dir)")
    common.add_run_args(ap)
    a = ap.parse_args(argv)
    on_gpu = a.device == "cuda"
    a.preset = a.preset or ("full" if on_gpu else "tiny")
    a.size = a.size or (512 if (on_gpu or a.preset == "full") else 256)
    a.frames = a.frames or (24 if on_gpu else 6)
    a.frames_short = a.frames_short or (8 if on_gpu else 2)
    a.repeats = a.repeats or (3 if on_gpu else 2)
    a.compile_repeats = a.compile_repeats or a.repeats
    a.regions = [int(p) for p in a.regions.split(",") if p.strip()]
    a.compile_regions = [int(p) for p in a.compile_regions.split(",") if p.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    a.timesteps = [", ".join(t.replace(",", " ").split()) for t in a.timesteps.split(";") if t.strip()]
    if a.size % 8 or a.size < 64:
        ap.error("--size must be a multiple of 8, at least 64")
    if a.repeats < 1 or a.warmup < 0 or not a.regions or min(a.regions) < 1 or not a.timesteps:
        ap.error("need --repeats >= 1, --warmup >= 0, region counts >= 1 and a timestep list")
    if not 1 <= a.frames_short < a.frames:
        ap.error("need 1 <= --frames-short < --frames")
    if a.frames < max(len(t.split(",")) for t in a.timesteps):
        ap.error("--frames must be at least the number of steps: only then is the pipe ever full")
    if bad := [m for m in a.modes if m not in MODES]:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
    return a


# -- running the node -----------------------------------------------------------------------

class Bench:
    """Shared inputs (model, prompts, palettes, latents) and one timed call of the node."""

    def __init__(self, host: common.Host, a: argparse.Namespace, model: Any, clip: Any, vae: Any) -> None:
        self.host, self.a, self.model, self.vae = host, a, model, vae
        self.node = host.node(NODE)
        self.negative = host.nodes.CLIPTextEncode().encode(clip, "")[0]
        self.palettes: dict[int, Any] = {}
        self.positive = None
        for p in sorted(set(a.regions) | set(a.compile_regions)):
            palette, background = common.build_palette(host, clip, p, a.size, a.size)
            self.palettes[p] = palette
            # the background prompt is the same in every palette: one positive for every variant,
            # so the region mode and P are the only differences
            self.positive = self.positive or background
        self._latents: dict[int, dict] = {}

    def latent(self, frames: int) -> dict:
        if frames not in self._latents:
            self._latents[frames] = self.host.nodes.EmptyLatentImage().generate(self.a.size, self.a.size, frames)[0]
        return self._latents[frames]

    def run(self, clock: common.CallbackClock, v: Variant, timesteps: str, frames: int) -> Run:
        """One node call of `frames` frames; keeps the intervals of the full ticks."""
        a = self.a
        steps = len(timesteps.split(","))
        graphs = _dynamo_graphs()
        clock.clear()
        self.host.sync()
        t0 = time.perf_counter()
        samples, _images = self.node.execute(
            self.model, self.positive, self.negative, self.latent(frames), timesteps, a.schedule_steps, a.seed,
            v.mode, a.cfg_mode, a.cfg, "torch.compile" if v.compiled else "eager", v.decode,
            palette=self.palettes.get(v.regions), vae=self.vae).result
        self.host.sync()
        call_s = time.perf_counter() - t0
        log(f"[{timesteps}] {v.key} F={frames}: {call_s:.2f} s")
        stamps = list(clock.stamps)
        if len(stamps) != frames + steps - 1:  # one stamp per tick: F frames + S - 1 flush ticks
            raise RuntimeError(f"{v.key}: expected {frames + steps - 1} tick callbacks, got {len(stamps)}")
        # tick i ends at stamps[i]; ticks S-1 .. F-1 have all S slots full (eager runs fewer rows
        # during warm-up and flush; fixed-batch compiled runs pad those), and each emits one frame
        ticks = [stamps[i] - stamps[i - 1] for i in range(max(1, steps - 1), frames)]
        return Run(frames, call_s, ticks, samples["samples"], _dynamo_graphs() - graphs)


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON): shows how far a run that was cut off got."""
    print(f"stream_fps: {message}", file=sys.stderr, flush=True)


def _dynamo_graphs() -> int:
    """Graphs torch._dynamo has compiled in this process so far (0 if it was never imported)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo else 0


def summarize(v: Variant, steps: int, long: list[Run], short: list[Run], first_call_s: float | None) -> dict[str, Any]:
    """ms/frame three ways: median full-tick interval, (t(F) - t(F2)) / (F - F2), and t(F) / F."""
    ticks = sorted(t for r in long + short for t in r.tick_s)
    # inclusive: with a handful of ticks the default (exclusive) method extrapolates past the data
    q = statistics.quantiles(ticks, n=4, method="inclusive") if len(ticks) >= 2 else [ticks[0]] * 3
    tick_ms = 1e3 * statistics.median(ticks)
    diff_ms = 1e3 * statistics.median((lo.call_s - sh.call_s) / (lo.frames - sh.frames) for lo, sh in zip(long, short))
    call_ms = 1e3 * statistics.median(r.call_s / r.frames for r in long)
    out = {
        "mode": v.mode, "regions": v.regions, "compile": "torch.compile" if v.compiled else "eager", "decode": v.decode,
        "rows_per_tick": v.rows_per_tick(steps),
        "ms_per_frame": round(tick_ms, 3),
        "fps": _fps(tick_ms),
        "ms_per_frame_p25": round(1e3 * q[0], 3),
        "ms_per_frame_p75": round(1e3 * q[2], 3),
        "ticks_timed": len(ticks),
        "ms_per_frame_differential": round(diff_ms, 3),
        "fps_differential": _fps(diff_ms),
        "ms_per_frame_whole_call": round(call_ms, 3),
        "fps_whole_call": _fps(call_ms),
        "graphs_compiled_in_timed_runs": sum(r.graphs for r in long + short),
    }
    if first_call_s is not None:
        out["first_call_s"] = round(first_call_s, 2)  # includes compilation for compiled variants
    return out


def _fps(ms: float) -> float | None:
    return round(1e3 / ms, 2) if ms > 0 else None  # a differential can come out <= 0 on a noisy CPU


def time_variants(bench: Bench, clock: common.CallbackClock, variants: list[Variant], timesteps: str,
                  interleave: bool) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Warm up, then time (F, F2) pairs of every variant; returns (summary per key, short-run samples per key).

    interleave: every round runs every variant once, the order rotated between rounds, so drift
    (clock speed, heat, other load) spreads over all variants. Compiled variants are timed one at a
    time instead (interleave False), each after torch._dynamo.reset(), as a workflow with one
    compiled sampler would run: in one process they would share dynamo's recompile limit.
    """
    a = bench.a
    steps = len(timesteps.split(","))
    first: dict[str, float] = {}
    long: dict[str, list[Run]] = {v.key: [] for v in variants}
    short: dict[str, list[Run]] = {v.key: [] for v in variants}

    def warm(v: Variant) -> None:
        # fills K/V and bias caches, loads weights, compiles; a compiled variant gets two runs: the
        # second call's fresh RCCA hooks fail a dynamo guard once more and recompile a graph
        for i in range(max(a.warmup, 2) if v.compiled else a.warmup):
            r = bench.run(clock, v, timesteps, a.frames_short)
            if i == 0:
                first[v.key] = r.call_s

    def timed(v: Variant) -> None:
        long[v.key].append(bench.run(clock, v, timesteps, a.frames))
        short[v.key].append(bench.run(clock, v, timesteps, a.frames_short))

    if interleave:
        for v in variants:
            warm(v)
        for r in range(a.repeats):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                timed(v)
    else:
        import torch._dynamo
        for v in variants:
            torch._dynamo.reset()
            warm(v)
            for _ in range(a.compile_repeats):
                timed(v)
    summary = {v.key: summarize(v, steps, long[v.key], short[v.key], first.get(v.key)) for v in variants}
    return summary, {k: runs[-1].samples for k, runs in short.items()}


# -- report ---------------------------------------------------------------------------------

def ratios(variants: dict[str, dict], regions: list[int]) -> dict[str, Any]:
    """fps ratios, per compile setting: P = max over P = min, RCCA over SemanticDraw, over no regions."""
    out: dict[str, Any] = {}
    for comp in ("eager", "compile"):
        fps = {k.rsplit("/", 1)[0]: v["fps"] for k, v in variants.items() if k.endswith("/" + comp)}
        if not fps:
            continue
        r: dict[str, Any] = {}
        lo, hi = min(regions), max(regions)
        for mode in ("rcca", "semantic_draw"):
            a_, b_ = fps.get(f"{mode}/P{hi}"), fps.get(f"{mode}/P{lo}")
            if a_ and b_ and hi != lo:
                r[f"{mode}_P{hi}_over_P{lo}"] = common.ratio(a_, b_)
        r["rcca_over_semantic_draw"] = {str(p): common.ratio(fps[f"rcca/P{p}"], fps[f"semantic_draw/P{p}"])
                                        for p in regions if fps.get(f"rcca/P{p}") and fps.get(f"semantic_draw/P{p}")}
        if fps.get("none"):
            for mode in ("rcca", "semantic_draw"):
                r[f"{mode}_over_none"] = {str(p): common.ratio(fps[f"{mode}/P{p}"], fps["none"])
                                          for p in regions if fps.get(f"{mode}/P{p}")}
        out[comp] = {k: v for k, v in r.items() if v}
    compiled = {k.rsplit("/", 1)[0]: common.ratio(v["fps"], variants[k.replace("/compile", "/eager")]["fps"])
                for k, v in variants.items() if k.endswith("/compile") and k.replace("/compile", "/eager") in variants
                and v["fps"] and variants[k.replace("/compile", "/eager")]["fps"]}
    if compiled:
        out["compile_over_eager"] = compiled
    return out


def targets(results: list[dict], meaningful: bool) -> dict[str, Any]:
    """The issue's targets, read off the 4-step default list (None where not measured)."""
    res = next((r for r in results if r["timesteps"] == DEFAULT_TIMESTEPS), None)
    var = res["variants"] if res else {}

    def fps(key: str) -> float | None:
        return var.get(key, {}).get("fps")

    def at_least(value: float | None, threshold: float) -> bool | None:
        return None if value is None else value >= threshold

    def scaling(mode: str, comp: str) -> float | None:
        hi, lo = fps(f"{mode}/P8/{comp}"), fps(f"{mode}/P1/{comp}")
        return common.ratio(hi, lo) if hi and lo else None

    checks = {
        f"rcca_P{TARGET_P}_fps_compile": {"value": fps(f"rcca/P{TARGET_P}/compile"), "min": TARGET_FPS_COMPILED,
                                           "semantic_draw": fps(f"semantic_draw/P{TARGET_P}/compile")},
        f"rcca_P{TARGET_P}_fps_eager": {"value": fps(f"rcca/P{TARGET_P}/eager"), "min": TARGET_FPS_EAGER,
                                         "semantic_draw": fps(f"semantic_draw/P{TARGET_P}/eager")},
        "rcca_fps_P8_over_P1_eager": {"value": scaling("rcca", "eager"), "min": TARGET_SCALING,
                                      "semantic_draw": scaling("semantic_draw", "eager")},
        "rcca_fps_P8_over_P1_compile": {"value": scaling("rcca", "compile"), "min": TARGET_SCALING,
                                        "semantic_draw": scaling("semantic_draw", "compile")},
    }
    for c in checks.values():
        c["met"] = at_least(c["value"], c["min"])
    measured = [c["met"] for c in checks.values() if c["met"] is not None]
    return {
        "timesteps": DEFAULT_TIMESTEPS,
        "checks": checks,
        # None when nothing was measured; else every measured check must hold
        "met": all(measured) if measured else None,
        "meaningful": meaningful,
        "note": ("targets are for the full SD1.5 UNet at 512 x 512 fp16 on an H100-class GPU, 4 steps; fps is the "
                 "steady-state full-tick figure" + ("" if meaningful else "; this run is not that, so 'met' says nothing about it")),
    }


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on every platform
        return None


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    load_start = _load_average()
    if a.threads:
        torch.set_num_threads(a.threads)
    host = common.setup_comfy(a.device, a.comfyui)
    try:
        t_setup = time.perf_counter()
        name, write_s = common.prepare_checkpoint(host, a.preset, a.ckpt)
        t_load = time.perf_counter()
        model, clip, vae = common.load_checkpoint_with_vae(host, name)
        bench = Bench(host, a, model, clip, vae)
        t_bench = time.perf_counter()

        eager = ([Variant("none", 0, False)] if "none" in a.modes else []) + [
            Variant(m, p, False) for m in ("rcca", "semantic_draw") if m in a.modes for p in a.regions]
        compiled = ([Variant("none", 0, True)] if a.compile and "none" in a.modes else []) + [
            Variant(m, p, True) for m in ("rcca", "semantic_draw") if a.compile and m in a.modes for p in a.compile_regions]
        # one RCCA variant again with the TAESD decode: its extra per-frame cost is the decode's
        decoded = Variant("rcca", TARGET_P if TARGET_P in a.regions else a.regions[0], False, "vae")
        time_decode = "rcca" in a.modes and not a.no_vae_decode
        # each compiled variant compiles again per timestep list (its own shapes): by default only
        # the list the targets are on (or the first list when that one is not run)
        compile_list = DEFAULT_TIMESTEPS if DEFAULT_TIMESTEPS in a.timesteps else a.timesteps[0]
        results, sanity, decode = [], {"all_finite": True}, None
        with common.CallbackClock(host) as clock:
            for i, ts in enumerate(a.timesteps):
                steps = len(ts.split(","))
                # the TAESD decode costs the same per frame whatever the timesteps: time it once
                with_decode = eager + ([decoded] if i == 0 and time_decode else [])
                variants, samples = time_variants(bench, clock, with_decode, ts, interleave=True)
                compile_here = a.compile_timesteps == "all" or ts == compile_list
                if compiled and compile_here:
                    cv, cs = time_variants(bench, clock, compiled, ts, interleave=False)
                    variants.update(cv)
                    samples.update(cs)
                if decoded.key in variants:
                    d = variants.pop(decoded.key)
                    base = variants[decoded.key.rsplit("/", 1)[0]]
                    decode = {
                        "variant": decoded.key, "decoder": type(vae.first_stage_model).__name__,
                        "timesteps": ts,
                        "ms_per_frame_differential": d["ms_per_frame_differential"],
                        "fps_differential": d["fps_differential"],
                        "ms_per_frame_whole_call": d["ms_per_frame_whole_call"],
                        # the node decodes all F frames in one batch after the stream; a live
                        # viewer decoding frame by frame would pay at least this much per frame
                        "decode_ms_per_frame": round(d["ms_per_frame_differential"] - base["ms_per_frame_differential"], 3),
                        "latent2rgb_ms_per_frame_differential": base["ms_per_frame_differential"],
                    }
                    samples.pop(decoded.key, None)
                sanity["all_finite"] &= all(bool(torch.isfinite(s).all()) for s in samples.values())
                # each region mode must change the frames, else its cost was measured on a no-op
                if "none/eager" in samples:
                    for k, s in samples.items():
                        if k != "none/eager" and not k.startswith("none/"):
                            sanity.setdefault("differs_from_none", {})[f"{steps} steps: {k}"] = not torch.equal(s, samples["none/eager"])
                for k, s in samples.items():
                    if k.endswith("/compile") and k.replace("/compile", "/eager") in samples:
                        sanity.setdefault("compile_vs_eager_max_rel_diff", {})[f"{steps} steps: {k}"] = round(
                            _max_rel_diff(s, samples[k.replace("/compile", "/eager")]), 6)
                results.append({
                    "timesteps": ts,
                    "steps": steps,
                    "variants": variants,
                    "ratios": ratios(variants, a.regions),
                })
        t_end = time.perf_counter()

        meaningful = a.device == "cuda" and a.preset == "full" and a.size == 512
        dynamo = sys.modules.get("torch._dynamo")
        report = {
            "benchmark": "stream_fps",
            # CPU load (1-minute average) at start and end: other processes on the cores show up here first
            "environment": {**common.environment(host), "load_average": {"start": load_start, "end": _load_average()}},
            "preset": a.preset,
            "checkpoint": (f"{a.ckpt or 'temp file'}: written from the random {a.preset} preset" if write_s
                           else f"{a.ckpt}: existing file"),
            "checkpoint_dtype": "fp16",
            "unet_dtype": str(model.model.get_dtype()).replace("torch.", ""),
            "size": [a.size, a.size],
            "latent_hw": [a.size // 8, a.size // 8],
            "frames": {"long": a.frames, "short": a.frames_short},
            "repeats": a.repeats,
            "warmup": a.warmup,
            "regions": a.regions,
            "modes": a.modes,
            "cfg_mode": a.cfg_mode,
            "cfg": a.cfg if a.cfg_mode != "none" else 1.0,
            "schedule_steps": a.schedule_steps,
            "compile": {"enabled": a.compile, "regions": a.compile_regions if a.compile else [],
                        "timesteps": ([t for t in a.timesteps if a.compile_timesteps == "all" or t == compile_list]
                                      if a.compile else []),
                        "repeats": a.compile_repeats if a.compile else 0,
                        "mode": (None if not a.compile else
                                 "inductor, reduce-overhead (CUDA graphs)" if a.device == "cuda" else "inductor, default mode"),
                        "recompile_limit": getattr(dynamo.config, "recompile_limit", None) if dynamo else None},
            "metric": {
                "ms_per_frame / fps": "median interval between the ends of consecutive full ticks (all S slots "
                                      "occupied, one frame out per tick; device synchronised at each stamp), over "
                                      "every timed run: the steady-state stream rate, UNet + stream bookkeeping",
                "ms_per_frame_differential": "median over repeats of (t(F) - t(F2)) / (F - F2), t = whole node call: "
                                             "per-frame cost with per-call costs (clone, caches, model load, warm-up and "
                                             "flush ticks, compilation) cancelled; includes the per-frame decode",
                "ms_per_frame_whole_call": "median t(F) / F: what one call of F frames costs per frame, everything included",
                "ratios": "fps over fps, each at the same compile setting and timestep list",
                "decode": "latent2rgb for every variant; 'decode' repeats one variant with the checkpoint's TAESD VAE",
            },
            "results": results,
            "decode": decode,
            "targets": targets(results, meaningful),
            "sanity": sanity,
            "seconds": {
                "setup": round(t_setup - t_start, 2),
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
