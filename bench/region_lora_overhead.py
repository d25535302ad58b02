#!/usr/bin/env python3
"""KSampler per-step time with region LoRAs (RCCA, one pass) vs a global LoRA and ComfyUI's hook LoRAs; prints JSON.

Same process, checkpoint, latent and seed for every variant; P = 4 vertical-stripe regions:

  unpatched     the plain model, positive = the palette's background prompt
  lora_global   one LoRA on the whole model (LoraLoaderModelOnly, strength 1): the cost of a LoRA at all
  rcca_L0       RCCA Attention Patch, 4 regions, no region LoRA
  rcca_L1/2/4   the same with a Region LoRA on the first 1 / 2 / 4 regions (one distinct LoRA each)
  hooks_H<n>    ComfyUI 0.3.75's own regional LoRA, built as a user wires it: per region
                CLIPTextEncode(prompt) -> CreateHookLoraModelOnly(its LoRA) -> Cond Set Props
                (mask = the stripe, hooks) and the four combined (Cond Set Props Combine); regions
                past n get no hook. ComfyUI cannot batch conds with different hooks, so it runs one
                model call per hook group (and one more for the uncond at cfg > 1).

The LoRAs are random rank-16 LoRAs over attention + ff + proj_in/out + resnet convs
(scripts/random_lora.py), written to a temp loras folder registered with folder_paths.
Runs are interleaved and repeated (bench/common.py); the figure is the median per-step time.
Model calls per step are counted with a forward pre-hook on the diffusion model (one untimed run).

  CPU (default: tiny preset, 256 x 256):   .host/venv/bin/python bench/region_lora_overhead.py
  GPU (full SD1.5 UNet, 512 x 512, fp16):  python3 bench/region_lora_overhead.py --device cuda --preset full
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REGIONS = 4
LORA_KINDS = ("attention", "ff", "proj", "conv")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("tiny", "stock", "full"), default=None,
                    help="random checkpoint layout (default: tiny on cpu, full on cuda)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", type=int, default=None,
                    help="image width = height in pixels (default: 512 for full or on cuda, else 256)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps per run (default: cpu 10, cuda 20)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant and cfg (default: cpu 5, cuda 6)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and cfg first")
    ap.add_argument("--loras", default="0,1,2,4", help="comma list: region LoRA counts for the RCCA variants")
    ap.add_argument("--hook-loras", default="4",
                    help="comma list: hooked region counts for ComfyUI's hook variant (empty: none)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the random LoRAs")
    ap.add_argument("--lora-scale", type=float, default=0.5,
                    help="size of a random LoRA's delta relative to a unit-variance layer (random_lora's default)")
    ap.add_argument("--cfg", default="1,7", help="comma list of cfg values; 1 skips the uncond pass")
    ap.add_argument("--mode", choices=("soft", "hard"), default="soft")
    ap.add_argument("--ckpt", default=None,
                    help="checkpoint file to use; written from the preset there if missing (default: temp dir)")
    common.add_run_args(ap)
    a = ap.parse_args(argv)
    on_gpu = a.device == "cuda"
    a.preset = a.preset or ("full" if on_gpu else "tiny")
    a.size = a.size or (512 if (on_gpu or a.preset == "full") else 256)
    a.steps = a.steps or (20 if on_gpu else 10)
    a.repeats = a.repeats or (6 if on_gpu else 5)
    a.loras = [int(n) for n in a.loras.split(",") if n.strip()]
    a.hook_loras = [int(n) for n in a.hook_loras.split(",") if n.strip()]
    a.cfg = [float(c) for c in a.cfg.split(",") if c.strip()]
    if a.size % 8 or a.size < 64:
        ap.error("--size must be a multiple of 8, at least 64")
    if a.steps < 2 or a.repeats < 1:
        ap.error("need --steps >= 2 and --repeats >= 1")
    if any(not 0 <= n <= REGIONS for n in a.loras) or any(not 1 <= n <= REGIONS for n in a.hook_loras):
        ap.error(f"--loras counts must be 0..{REGIONS}, --hook-loras counts 1..{REGIONS}")
    return a


class CallCounter:
    """Counts calls of the diffusion model (forward pre-hook) and the latent rows they carry."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handle = diffusion_model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        if args and torch.is_tensor(args[0]):
            self.rows += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0

    def remove(self) -> None:
        self._handle.remove()


def write_loras(host: common.Host, model: Any, count: int, rank: int, scale: float) -> list[str]:
    """`count` random LoRAs (distinct seeds) in a temp loras folder registered with folder_paths."""
    import folder_paths
    import random_lora
    d = host.base / "loras"
    d.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(d), is_default=True)
    names = []
    for i in range(count):
        name = f"region_lora_{i}.safetensors"
        random_lora.write_lora(d / name, model.model, seed=100 + i, rank=rank, kinds=LORA_KINDS, scale=scale)
        names.append(name)
    return names


def lora_palette(host: common.Host, clip: Any, size: int, lora_names: list[str]) -> tuple[Any, Any]:
    """(palette, background) for 4 stripes, the first len(lora_names) with a Region LoRA each."""
    add = host.node("RCCAAddRegion")
    region_lora = host.node("RCCARegionLoRA")
    chain = None
    for i, mask in enumerate(common.stripe_masks(REGIONS, size, size)):
        lora = region_lora.execute(lora_names[i], 1.0).result[0] if i < len(lora_names) else None
        chain = add.execute(mask, common.region_prompt(i), 1.0, regions=chain, lora=lora).result[0]
    palette, background, _coverage = host.node("RCCARegionalPromptPalette").execute(
        clip, common.BACKGROUND_PROMPT, size, size, chain).result
    return palette, background


def hook_conditioning(host: common.Host, clip: Any, size: int, lora_names: list[str]) -> list:
    """ComfyUI's hook-based regional LoRA as a user builds it (comfy_extras/nodes_hooks.py): per
    stripe its encoded prompt, masked, with its own LoRA hook (none past len(lora_names)), combined."""
    from comfy_extras import nodes_hooks
    encode = host.nodes.CLIPTextEncode()
    combined = None
    for i, mask in enumerate(common.stripe_masks(REGIONS, size, size)):
        cond = encode.encode(clip, common.region_prompt(i))[0]
        hooks = None
        if i < len(lora_names):
            hooks = nodes_hooks.CreateHookLoraModelOnly().create_hook_model_only(lora_names[i], 1.0)[0]
        if combined is None:
            combined = nodes_hooks.ConditioningSetProperties().set_properties(
                cond, 1.0, "default", mask=mask, hooks=hooks)[0]
        else:
            combined = nodes_hooks.ConditioningSetPropertiesAndCombine().set_properties(
                combined, cond, 1.0, "default", mask=mask, hooks=hooks)[0]
    return combined


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    if a.threads:
        torch.set_num_threads(a.threads)
    host = common.setup_comfy(a.device, a.comfyui)
    counter = None
    try:
        t_setup = time.perf_counter()
        name, write_s = common.prepare_checkpoint(host, a.preset, a.ckpt)
        t_load = time.perf_counter()
        model, clip = common.load_checkpoint(host, name)
        nodes = host.nodes
        lora_names = write_loras(host, model, REGIONS, a.rank, a.lora_scale)
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(a.size, a.size, 1)[0]

        # name -> (MODEL, positive); every variant but the hook ones gets the background prompt
        variants: dict[str, tuple[Any, Any]] = {}
        background = None
        rcca: dict[int, Any] = {}
        for n in a.loras:
            palette, bg = lora_palette(host, clip, a.size, lora_names[:n])
            background = background or bg
            rcca[n] = common.patch_model(host, model, palette, a.mode)
        if background is None:
            background = lora_palette(host, clip, a.size, [])[1]
        variants["unpatched"] = (model.clone(), background)
        variants["lora_global"] = (nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_names[0], 1.0)[0],
                                   background)
        for n, m in rcca.items():
            variants[f"rcca_L{n}"] = (m, background)
        for n in a.hook_loras:
            variants[f"hooks_H{n}"] = (model.clone(), hook_conditioning(host, clip, a.size, lora_names[:n]))
        t_bench = time.perf_counter()

        counter = CallCounter(model.model.diffusion_model)
        results = []
        sanity: dict[str, bool] = {"all_finite": True}
        with common.StepTimer(host) as timer:
            for cfg in a.cfg:
                runs: dict[str, list] = {k: [] for k in variants}
                samples: dict[str, torch.Tensor] = {}
                names = list(variants)

                def run(k: str):
                    m, pos = variants[k]
                    return timer.sample(m, pos, negative, latent, a.steps, cfg, a.seed)

                # untimed: warm-up, and one run per variant that counts model calls
                calls: dict[str, dict[str, float]] = {}
                for k in names:
                    for _ in range(a.warmup):
                        run(k)
                    counter.reset()
                    samples[k] = run(k).samples
                    calls[k] = {"model_calls_per_step": round(counter.calls / a.steps, 3),
                                "rows_per_step": round(counter.rows / a.steps, 3)}
                for r in range(a.repeats):
                    k0 = r % len(names)
                    for k in names[k0:] + names[:k0]:
                        t = run(k)
                        runs[k].append(t)
                        samples[k] = t.samples
                summary = {k: {**common.summarize(runs[k]), **calls[k]} for k in names}
                base = summary["unpatched"]
                for k, s in summary.items():
                    s["ratio"] = common.ratio(s["step_ms"], base["step_ms"])
                    s["run_ratio"] = common.ratio(s["run_ms_per_step"], base["run_ms_per_step"])
                sanity["all_finite"] = sanity["all_finite"] and all(
                    bool(torch.isfinite(s).all()) for s in samples.values())
                diff = {}
                for k in names:
                    ref = "rcca_L0" if k.startswith("rcca_L") and k != "rcca_L0" and "rcca_L0" in samples else "unpatched"
                    if k != ref:
                        diff[f"{k}_vs_{ref}"] = round(float((samples[k] - samples[ref]).abs().mean()), 6)
                results.append({
                    "cfg": cfg,
                    "unpatched_mean_abs_output": round(float(samples["unpatched"].abs().mean()), 6),
                    "variants": summary,
                    "mean_abs_diff": diff,
                })
                for key, v in diff.items():
                    sanity[f"{key}_differs"] = sanity.get(f"{key}_differs", True) and v > 0
        t_end = time.perf_counter()

        table = {str(r["cfg"]): {k: {"ratio": s["ratio"], "model_calls_per_step": s["model_calls_per_step"]}
                                 for k, s in r["variants"].items()} for r in results}
        report = {
            "benchmark": "region_lora_overhead",
            "environment": common.environment(host),
            "config": {
                "preset": a.preset,
                "checkpoint": (f"{a.ckpt or 'temp file'}: written from the random {a.preset} preset" if write_s
                               else f"{a.ckpt}: existing file"),
                "unet_dtype": str(model.model.get_dtype()).replace("torch.", ""),
                "size": [a.size, a.size],
                "latent_hw": [a.size // 8, a.size // 8],
                "batch": 1,
                "sampler": "euler",
                "scheduler": "normal",
                "mode": a.mode,
                "regions": REGIONS,
                "region_layout": "vertical stripes, sharp edges",
                "lora": {"rank": a.rank, "scale": a.lora_scale, "kinds": list(LORA_KINDS), "strength": 1.0, "files": lora_names},
                "rcca_lora_counts": a.loras,
                "hook_lora_counts": a.hook_loras,
                "steps": a.steps,
                "repeats": a.repeats,
                "warmup": a.warmup,
                "cfg": a.cfg,
            },
            "variants_doc": {
                "unpatched": "plain model, background prompt",
                "lora_global": "LoraLoaderModelOnly(LoRA 0, 1.0), background prompt",
                "rcca_L<n>": f"RCCA Attention Patch ({a.mode}), {REGIONS} stripes, Region LoRA on the first n",
                "hooks_H<n>": f"no patch; positive = {REGIONS} masked stripe conds (Cond Set Props / Combine), "
                              "the first n with CreateHookLoraModelOnly hooks",
            },
            "metric": ("step_ms: median over end-of-step to end-of-step intervals (steps 2..N of every timed run, "
                       "device synchronised at each stamp); ratio = variant step_ms / unpatched step_ms at the same "
                       "cfg; run_ms_per_step: median whole KSampler call / steps (per-call setup, LoRA patching and "
                       "model switching included). model_calls_per_step / rows_per_step: diffusion-model forward "
                       "calls and the latent rows they carried, per step, counted in one untimed run."),
            "summary": table,
            "results": results,
            "sanity": sanity,
            "seconds": {
                "setup": round(t_setup - t_start, 2),
                "checkpoint_write": round(write_s, 2),
                "load_encode_loras": round(t_bench - t_load, 2),
                "timed_section": round(t_end - t_bench, 2),
                "total": round(t_end - t_start, 2),
            },
        }
    finally:
        if counter is not None:
            counter.remove()
        host.close()
    common.emit_report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
