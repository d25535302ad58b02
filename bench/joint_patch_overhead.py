#!/usr/bin/env python3
"""KSampler per-step time, RCCA-patched vs unpatched, on joint-attention models (Flux.1, SD3 / SD3.5),
for P regions; prints one JSON object.

Same process, same model, same latent and conditioning: the only difference between the
variants is the RCCA Attention Patch (palette of P vertical-stripe regions, whose prompts'
tokens are appended to the joint sequence). Runs are interleaved and repeated; the figure is
the median per-step time (see bench/common.py). With --mode soft (default) a P = 4 hard-mode
variant is timed alongside (--no-hard-ref drops it), so soft mode's own cost reads off directly;
--feather PX gives the stripes soft edges, the rows where soft mode normalises the text masses.

  CPU (default: tiny Flux / SD3 checkpoints with their tiny text encoders, 128 x 128):
      .host/venv/bin/python bench/joint_patch_overhead.py --threads 1
  GPU (full Flux.1-dev and SD3.5-medium diffusion models at 1024 x 1024, bf16, random weights,
  built in-process without text encoders; prompts are random embeddings of the real shapes):
      python3 bench/joint_patch_overhead.py --device cuda --layout full      (or bench/gpu_run.sh joint)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_P = 4
TARGET_MAX_RATIO = 1.15
FLUX_GUIDANCE = 3.5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=("flux", "sd3", "both"), default="both")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--layout", choices=("tiny", "full"), default=None,
                    help="model layout (default: tiny on cpu, full on cuda); full = Flux.1-dev / SD3.5-medium")
    ap.add_argument("--build", choices=("checkpoint", "inprocess"), default=None,
                    help="checkpoint: write the tiny all-in-one checkpoint and load it with its text encoders "
                         "(tiny only); inprocess: diffusion model built on the device, fake prompt embeddings "
                         "(default: checkpoint for tiny, inprocess for full)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="inprocess weights (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--size", type=int, default=None, help="width = height in pixels (default: full 1024, tiny 128)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps per run (default: cpu 5, cuda 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant and cfg (default: cpu 5, cuda 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and cfg first")
    ap.add_argument("--regions", default="1,2,4,8", help="comma list of region counts P")
    ap.add_argument("--sd3-cfg", default="1,4.5", help="comma list of SD3 cfg values (Flux always runs at cfg 1 "
                                                       f"with guidance {FLUX_GUIDANCE})")
    ap.add_argument("--mode", choices=("soft", "hard"), default="soft")
    ap.add_argument("--no-hard-ref", action="store_true",
                    help=f"soft mode: do not time the P = {TARGET_P} hard-mode variant alongside")
    ap.add_argument("--no-tokens-ref", action="store_true",
                    help=f"do not time the P = {TARGET_P} 'tokens only' variant (unpatched model, context extended "
                         "by the region prompts' tokens, no bias): the cost of the longer sequence alone")
    ap.add_argument("--feather", type=int, default=0,
                    help="soft stripe edges this many pixels wide (0: sharp stripes, as the SD1.5 bench)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="inprocess: tokens per prompt (default Flux 256 = T5 min length, SD3 154 = 77 CLIP + 77 T5)")
    ap.add_argument("--no-profile", action="store_true",
                    help=f"skip the extra (untimed for ratios) P = {TARGET_P} run that clocks soft normalisation")
    common.add_run_args(ap)
    a = ap.parse_args(argv)
    on_gpu = a.device == "cuda"
    a.layout = a.layout or ("full" if on_gpu else "tiny")
    a.build = a.build or ("inprocess" if a.layout == "full" else "checkpoint")
    if a.build == "checkpoint" and a.layout == "full":
        ap.error("--layout full is built in-process (no text encoders of that size are written)")
    a.dtype = a.dtype or ("bf16" if on_gpu else "fp32")
    a.size = a.size or (1024 if a.layout == "full" else 128)
    a.steps = a.steps or (8 if on_gpu else 5)
    a.repeats = a.repeats or (3 if on_gpu else 5)
    a.regions = [int(p) for p in a.regions.split(",") if p.strip()]
    a.sd3_cfg = [float(c) for c in a.sd3_cfg.split(",") if c.strip()]
    a.families = ("flux", "sd3") if a.family == "both" else (a.family,)
    if a.size % 16 or a.size < 32:
        ap.error("--size must be a multiple of 16 (whole 2 x 2 patches of the latent), at least 32")
    if a.steps < 2 or a.repeats < 1 or not a.regions or min(a.regions) < 1:
        ap.error("need --steps >= 2, --repeats >= 1 and region counts >= 1")
    return a


class NormalizeClock:
    """Wraps rcca_core.joint.normalize_joint_mass (the soft-mode extra work at each attention call
    with mixed rows) to count its calls and time them (device synchronised before and after; only
    used in a separate profiling run, never in the timed comparison)."""

    def __init__(self, host: common.Host) -> None:
        self.host = host
        self.joint = common.pack_module(host, "rcca_core.joint")
        self.calls = 0
        self.seconds = 0.0

    def __enter__(self) -> "NormalizeClock":
        original = self._original = self.joint.normalize_joint_mass

        def timed(*args, **kwargs):
            self.host.sync()
            t = time.perf_counter()
            out = original(*args, **kwargs)
            self.host.sync()
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out
        self.joint.normalize_joint_mass = timed  # attention_override looks it up in the module at each call
        return self

    def __exit__(self, *exc: Any) -> None:
        self.joint.normalize_joint_mass = self._original


def mixed_rows(model: Any) -> bool | None:
    """Whether any bias the patch built has image tokens reading several prompts (soft mode then
    normalises at every attention call); None if it cannot be read (the pack changed)."""
    try:
        override = model.model_options["transformer_options"]["optimized_attention_override"]
        cache = override.__self__.prepared._bias
        return any(mixed for hit in cache.values() for _, mixed in hit.values())
    except (KeyError, AttributeError):
        return None


def tokens_only(host: common.Host, model: Any, palette: Any) -> Any:
    """A clone of the unpatched model whose context gets the palette's region tokens appended, as
    the patch does, but with no bias and no override: what the longer joint sequence costs alone."""
    import comfy.patcher_extension
    extra = torch.cat([r.context for r in palette.regions], dim=1)

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        ctx = torch.cat([c_crossattn, extra.to(c_crossattn).expand(c_crossattn.shape[0], -1, -1)], dim=1)
        return executor(x, t, c_concat, ctx, control, transformer_options, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_tokens_only", wrapper)
    return clone


def setup_family(host: common.Host, a: argparse.Namespace, family: str) -> dict[str, Any]:
    """Model, positive / negative conditioning, latent and palettes for one family."""
    nodes = host.nodes
    info: dict[str, Any] = {"build": a.build}
    t = time.perf_counter()
    palettes: dict[int, Any] = {}
    if a.build == "checkpoint":
        name, write_s = common.prepare_dit_checkpoint(host, family)
        info["checkpoint"] = f"temp file {name}: written from random_checkpoints.TINY_{family.upper()}, fp32"
        info["checkpoint_write_s"] = round(write_s, 2)
        model, clip = common.load_checkpoint(host, name)
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        positive = None
        for p in a.regions:
            palette, background = common.build_palette(host, clip, p, a.size, a.size, a.feather)
            palettes[p] = palette
            positive = positive or background
        info["text_encoders"] = "the checkpoint's tiny CLIP / T5 (real tokenizers, random weights)"
    else:
        tokens, dim, pooled_dim = common.DIT_TEXT[(family, a.layout)]
        tokens = a.tokens or tokens
        model = common.build_dit_patcher(host, family, a.layout, DTYPES[a.dtype], a.seed)
        encode = common.fake_encoder(tokens, dim, a.seed)
        pooled = torch.randn(1, pooled_dim, generator=torch.Generator().manual_seed(a.seed + 1))
        for p in a.regions:
            palettes[p] = common.joint_palette(host, family, p, a.size, a.size, tokens, dim, a.feather, a.seed)
        positive = common.dit_conditioning(palettes[a.regions[0]].background_context, pooled)
        negative = common.dit_conditioning(encode(""), torch.zeros_like(pooled))
        info["text_encoders"] = (f"none: prompts are random embeddings (1, {tokens}, {dim}), pooled (1, {pooled_dim}), "
                                 "via rcca_core.palette.Palette.build with a fake encoder")
        info["tokens_per_prompt"] = tokens
    if family == "flux":
        positive = common.set_guidance(positive, FLUX_GUIDANCE)
    latent = {"samples": torch.zeros(1, 16, a.size // 8, a.size // 8)}
    variants: dict[str, Any] = {"unpatched": model.clone()}
    for p in a.regions:
        variants[f"P{p}"] = common.patch_model(host, model, palettes[p], a.mode)
    hard_ref = a.mode == "soft" and not a.no_hard_ref and TARGET_P in palettes
    if hard_ref:
        variants[f"P{TARGET_P}_hard"] = common.patch_model(host, model, palettes[TARGET_P], "hard")
    if not a.no_tokens_ref and TARGET_P in palettes:
        variants[f"P{TARGET_P}_tokens_only"] = tokens_only(host, model, palettes[TARGET_P])
    info["setup_s"] = round(time.perf_counter() - t, 2)
    base = model.model
    info["diffusion_model"] = type(base.diffusion_model).__name__
    info["model_config"] = type(base.model_config).__name__
    info["params_m"] = round(sum(p.numel() for p in base.diffusion_model.parameters()) / 1e6, 1)
    info["weight_dtype"] = str(base.get_dtype()).replace("torch.", "")
    info["heads"] = getattr(base.diffusion_model, "num_heads", None)
    info["text_tokens_per_prompt"] = {"background": int(palettes[a.regions[0]].background_context.shape[1]),
                                      "regions": sorted({int(r.context.shape[1]) for pl in palettes.values()
                                                         for r in pl.regions})}
    return {"model": model, "positive": positive, "negative": negative, "latent": latent,
            "variants": variants, "hard_ref": hard_ref, "info": info}


def run_family(host: common.Host, a: argparse.Namespace, family: str) -> dict[str, Any]:
    s = setup_family(host, a, family)
    variants = s["variants"]
    cfgs = [1.0] if family == "flux" else a.sd3_cfg
    results = []
    finite, differs = True, True
    t_bench = time.perf_counter()
    with common.StepTimer(host, track_memory=True) as timer:
        for cfg in cfgs:
            summary, samples = common.compare_interleaved(
                timer, variants, s["positive"], s["negative"], s["latent"], a.steps, cfg, a.repeats, a.warmup, a.seed)
            finite = finite and all(bool(torch.isfinite(x).all()) for x in samples.values())
            differs = differs and all(not torch.equal(samples[k], samples["unpatched"]) for k in samples
                                      if k != "unpatched" and not k.endswith("_tokens_only"))
            base = summary["unpatched"]
            patched = {}
            for name in variants:
                if name == "unpatched":
                    continue
                x = summary[name]
                patched[name[1:]] = {**x, "ratio": common.ratio(x["step_ms"], base["step_ms"]),
                                     "run_ratio": common.ratio(x["run_ms_per_step"], base["run_ms_per_step"]),
                                     "mixed_rows": mixed_rows(variants[name])}
            entry = {"cfg": cfg,
                     "model_batch_rows": 1 if math.isclose(cfg, 1.0) else 2,
                     "unpatched": base, "patched": patched}
            hard = patched.get(f"{TARGET_P}_hard")
            if hard is not None and str(TARGET_P) in patched:
                entry[f"soft_over_hard_P{TARGET_P}"] = common.ratio(patched[str(TARGET_P)]["step_ms"], hard["step_ms"])
            tok = patched.get(f"{TARGET_P}_tokens_only")
            if tok is not None and str(TARGET_P) in patched:
                entry[f"patched_over_tokens_only_P{TARGET_P}"] = common.ratio(patched[str(TARGET_P)]["step_ms"],
                                                                            tok["step_ms"])
            if not a.no_profile and f"P{TARGET_P}" in variants:
                entry["normalize_profile"] = profile_normalize(host, timer, s, variants[f"P{TARGET_P}"], a, cfg)
            results.append(entry)
    t_end = time.perf_counter()
    out = {"family": family, **s["info"], "results": results,
           "sanity": {"all_finite": finite, "patched_output_differs": differs},
           "timed_section_s": round(t_end - t_bench, 2)}
    del s, variants
    common.free_models(host)
    return out


def profile_normalize(host: common.Host, timer: common.StepTimer, s: dict, model: Any, a: argparse.Namespace,
                      cfg: float) -> dict[str, Any]:
    """One extra P = TARGET_P run with normalize_joint_mass clocked: its share of the step."""
    with NormalizeClock(host) as clock:
        run = timer.sample(model, s["positive"], s["negative"], s["latent"], a.steps, cfg, a.seed)
    step_ms = 1e3 * run.run_s / a.steps
    norm_ms = 1e3 * clock.seconds / a.steps
    return {"P": TARGET_P, "normalize_calls_per_step": round(clock.calls / a.steps, 2),
            "normalize_ms_per_step": round(norm_ms, 3), "run_ms_per_step": round(step_ms, 3),
            "normalize_share": round(norm_ms / step_ms, 4) if step_ms > 0 else None,
            "note": "one extra run, synchronised around every normalize_joint_mass call; not part of the ratios"}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    host = common.setup_comfy(a.device, a.comfyui)
    try:
        families = [run_family(host, a, f) for f in a.families]
        t_end = time.perf_counter()
        ratios = {}
        for fam in families:
            for r in fam["results"]:
                if str(TARGET_P) in r["patched"]:
                    ratios[f"{fam['family']} cfg {r['cfg']:g}"] = r["patched"][str(TARGET_P)]["ratio"]
        meaningful = a.device == "cuda" and a.layout == "full" and a.size == 1024 and a.build == "inprocess"
        report = {
            "benchmark": "joint_patch_overhead",
            "environment": common.environment(host),
            "layout": a.layout,
            "build": a.build,
            "dtype": a.dtype if a.build == "inprocess" else "checkpoint fp32 (ComfyUI picks the compute dtype)",
            "size": [a.size, a.size],
            "latent_hw": [a.size // 8, a.size // 8],
            "image_tokens": (a.size // 16) ** 2,
            "batch": 1,
            "sampler": "euler",
            "scheduler": "normal",
            "mode": a.mode,
            "feather_px": a.feather,
            "steps": a.steps,
            "repeats": a.repeats,
            "warmup": a.warmup,
            "regions": a.regions,
            "flux": {"cfg": 1.0, "guidance": FLUX_GUIDANCE},
            "sd3_cfg": a.sd3_cfg,
            "metric": ("step_ms: median over all end-of-step to end-of-step intervals (steps 2..N of every timed "
                       "run, device synchronised at each stamp); ratio = patched step_ms / unpatched step_ms; "
                       "spread: step_ms_p25 / step_ms_p75. run_ms_per_step: median whole KSampler call / steps. "
                       "peak_cuda_mib: max allocated over a run (CUDA only). Variants 'P' use --mode; "
                       f"'{TARGET_P}_hard' is the same palette in hard mode (soft runs only); '{TARGET_P}_tokens_only' is the "
                       "unpatched model with the region prompts' tokens appended to its context and no bias (the "
                       "longer sequence alone; its output differs, so it is left out of the sanity check)."),
            "families": families,
            "target": {
                "P": TARGET_P,
                "max_ratio": TARGET_MAX_RATIO,
                "ratio_by_family_cfg": ratios,
                "met": all(v <= TARGET_MAX_RATIO for v in ratios.values()) if ratios else None,
                "meaningful": meaningful,
                "note": ("target is for the full Flux.1-dev / SD3.5-medium diffusion models at 1024 x 1024 bf16 on "
                         "a GPU" + ("" if meaningful else "; this run is not that, so 'met' says nothing about it")),
            },
            "sanity": {"all_finite": all(f["sanity"]["all_finite"] for f in families),
                       "patched_output_differs": all(f["sanity"]["patched_output_differs"] for f in families)},
            "seconds": {"total": round(t_end - t_start, 2)},
        }
    finally:
        host.close()
    common.emit_report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
