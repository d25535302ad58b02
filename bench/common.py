"""Shared pieces of the benchmarks: in-process ComfyUI, random checkpoints, palettes, step/tick clocks.

Nothing here is a test: benchmarks print numbers, they never assert on time.

ComfyUI is imported in this process (no server), as tests/host/conftest.py does, with two
differences: the device can be CUDA, and the pack is loaded straight from this checkout with
nodes.load_custom_node() (the host's custom_nodes/ link is an absolute path that does not exist
on a machine the tree was copied to). ComfyUI's built-in extra nodes are not loaded: KSampler,
the checkpoint loader and CLIPTextEncode live in nodes.py, and skipping comfy_extras keeps the
set of Python packages a bare GPU machine must have small.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
DEFAULT_COMFYUI = PACK_DIR / ".host" / "ComfyUI"
RCCA_NODES = ("RCCAAddRegion", "RCCARegionalPromptPalette", "RCCAAttentionPatch")

# distinct prompts so every region has its own tokens (cycled past 8 regions)
REGION_PROMPTS = (
    "a red fox sitting in tall grass", "a blue vintage car", "a lighthouse on a rocky cliff",
    "a bowl of ripe oranges", "a snowy mountain peak at dawn", "a wooden sailing boat",
    "a cat wearing a knitted scarf", "a field of yellow sunflowers",
)
BACKGROUND_PROMPT = "a wide landscape photograph, soft light"


# -- ComfyUI in-process ---------------------------------------------------------------------

@dataclass
class Host:
    """Handle on the in-process ComfyUI: its `nodes` module, the device and a temp root."""
    nodes: ModuleType
    device: str                       # "cpu" or "cuda"
    comfyui_dir: Path
    base: Path                        # temp root: checkpoints/ output/ input/ temp/ user/
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def node(self, node_id: str) -> Any:
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def sync(self) -> None:
        """Wait for queued GPU work, so perf_counter() reads finished work (no-op on CPU)."""
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def add_run_args(ap: Any) -> None:
    """The options every side-by-side benchmark takes: --comfyui, --threads, --seed, --out."""
    ap.add_argument("--comfyui", default=None, help="ComfyUI dir (default $COMFYUI_DIR or <pack>/.host/ComfyUI)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON to this file")


def setup_comfy(device: str = "cpu", comfyui_dir: str | os.PathLike | None = None) -> Host:
    """Import ComfyUI in this process on `device` and load this pack; returns a Host.

    Must run before anything imports comfy.model_management: the device is chosen at its import.
    """
    d = Path(comfyui_dir or os.environ.get("COMFYUI_DIR") or DEFAULT_COMFYUI).resolve()
    if not (d / "nodes.py").is_file():
        raise SystemExit(f"no ComfyUI at {d}: build it with scripts/setup_host.sh, or pass --comfyui DIR")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    sys.path.insert(0, str(PACK_DIR / "scripts"))  # random_checkpoints
    # comfy.cli_args parses no argv in-process (unless enable_args_parsing()), so this is the only knob
    from comfy.cli_args import args
    if device == "cpu":
        args.cpu = True  # before comfy.model_management is imported, which otherwise takes CUDA
    import folder_paths

    tmp = tempfile.TemporaryDirectory(prefix="rcca_bench_")
    base = Path(tmp.name)
    for sub in ("checkpoints", "output", "input", "temp", "user"):
        (base / sub).mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.add_model_folder_path("checkpoints", str(base / "checkpoints"), is_default=True)
    # ComfyUI/utils is a package; import it before `nodes`, which puts ComfyUI/comfy first on
    # sys.path (where comfy/utils.py would shadow it)
    import utils.extra_config  # noqa: F401
    import nodes
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars interleaved with the JSON

    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
        raise SystemExit(f"ComfyUI could not load the pack from {PACK_DIR} (see the log above)")
    missing = [n for n in RCCA_NODES if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise SystemExit(f"pack loaded but these nodes are missing: {missing}")
    return Host(nodes, device, d, base, tmp)


def environment(host: Host) -> dict[str, Any]:
    """Where the numbers came from: device, library versions, attention backend."""
    import comfy.ldm.modules.attention as attention
    try:
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = None
    if host.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_name()
    return {
        "device": host.device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if host.device == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "comfyui": comfy_version,
        "attention": getattr(attention.optimized_attention, "__name__", str(attention.optimized_attention)),
        "python": platform.python_version(),
        # modules replaced by bench/gpu_run.sh's import-only stubs (never called by this benchmark)
        # (vars(), not getattr: torch.ops and friends answer every attribute)
        "import_stubs": sorted(n for n, m in list(sys.modules.items())
                               if "." not in n and vars(m).get("__rcca_bench_stub__", False)),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- checkpoints ----------------------------------------------------------------------------

def prepare_checkpoint(host: Host, preset: str, ckpt: str | os.PathLike | None = None,
                       dtype: torch.dtype = torch.float16) -> tuple[str, float]:
    """Make a checkpoint loadable by name; returns (name, seconds spent writing it).

    ckpt None: write the preset's random checkpoint into the temp dir. ckpt a path: use that
    file if it exists (a real SD1.5 checkpoint works too), else write the preset there first,
    so a rerun skips the slow part (the full preset is ~1.7 GB).
    """
    import folder_paths
    import random_checkpoints as rc
    rc.register_tiny_sd15()  # harmless for stock/full: it only matches sub-320-channel UNets
    path = Path(ckpt).resolve() if ckpt else host.base / "checkpoints" / f"random_{preset}.safetensors"
    seconds = 0.0
    if not path.is_file():
        t = time.perf_counter()
        rc.write_checkpoint(path, rc.PRESETS[preset], seed=0, dtype=dtype)
        seconds = time.perf_counter() - t
    if path.parent != host.base / "checkpoints":
        folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    return path.name, seconds


def load_checkpoint(host: Host, name: str) -> tuple[Any, Any]:
    """(model, clip) through the stock loader node, as a workflow would get them."""
    model, clip = load_checkpoint_with_vae(host, name)[:2]
    return model, clip


def load_checkpoint_with_vae(host: Host, name: str) -> tuple[Any, Any, Any]:
    """(model, clip, vae) through the stock loader node; the random presets' VAE is a TAESD."""
    model, clip, vae = host.nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    return model, clip, vae


# -- palettes -------------------------------------------------------------------------------

def stripe_masks(regions: int, width: int, height: int, feather: int = 0) -> list[torch.Tensor]:
    """`regions` vertical stripes of (nearly) equal width covering the canvas, each (1, H, W).

    feather > 0: every inner edge becomes a linear ramp `feather` pixels wide, centred on the
    edge, where the two neighbours' coverages sum to 1 (soft edges: image tokens there read two
    prompts, which is what soft mode's mass normalisation is for). 0: sharp stripes.
    """
    edges = [round(i * width / regions) for i in range(regions + 1)]
    if feather > 0 and regions > 1 and feather >= min(b - a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"feather {feather} px must be narrower than the narrowest stripe")
    x = torch.arange(width, dtype=torch.float32) + 0.5  # column centres
    masks = []
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        if feather > 0:
            rise = ((x - (a - feather / 2)) / feather).clamp(0, 1) if i > 0 else torch.ones(width)
            fall = (((b + feather / 2) - x) / feather).clamp(0, 1) if i < regions - 1 else torch.ones(width)
            m = (rise * fall).expand(1, height, width).clone()
        else:
            m = torch.zeros(1, height, width)
            m[..., a:b] = 1.0
        masks.append(m)
    return masks


def region_prompt(i: int) -> str:
    return REGION_PROMPTS[i % len(REGION_PROMPTS)] + (f", variant {i}" if i >= len(REGION_PROMPTS) else "")


def build_palette(host: Host, clip: Any, regions: int, width: int, height: int,
                  feather: int = 0) -> tuple[Any, Any]:
    """(palette, background conditioning) for `regions` striped regions, via the pack's nodes."""
    add = host.node("RCCAAddRegion")
    chain = None
    for i, mask in enumerate(stripe_masks(regions, width, height, feather)):
        prompt = region_prompt(i)
        chain = add.execute(mask, prompt, 1.0, regions=chain).result[0]
    palette, background, _coverage = host.node("RCCARegionalPromptPalette").execute(
        clip, BACKGROUND_PROMPT, width, height, chain).result
    return palette, background


def patch_model(host: Host, model: Any, palette: Any, mode: str = "soft") -> Any:
    """Patched clone over the whole schedule and every block (the node's defaults)."""
    return host.node("RCCAAttentionPatch").execute(model, palette, mode, 0.0, 1.0, "all").result[0]


# -- joint-attention models (SD3 / SD3.5, Flux.1) -------------------------------------------

DIT_FAMILIES = ("flux", "sd3")
# what the real text encoders give per prompt: Flux T5-XXL pads to 256 tokens (min_length) and its
# pooled output is CLIP-L's; SD3 concatenates 77 CLIP-L/G tokens (padded to 4096) and 77 T5 tokens,
# pooled = CLIP-L + CLIP-G projections. Tiny widths are random_checkpoints.TINY_FLUX / TINY_SD3's.
DIT_TEXT = {  # (family, layout) -> (tokens per prompt, context width, pooled width)
    ("flux", "full"): (256, 4096, 768), ("sd3", "full"): (154, 4096, 2048),
    ("flux", "tiny"): (256, 64, 32), ("sd3", "tiny"): (154, 96, 80),
}


def prepare_dit_checkpoint(host: Host, family: str, dtype: torch.dtype = torch.float32) -> tuple[str, float]:
    """Write the tiny Flux / SD3 all-in-one checkpoint into the temp dir and teach ComfyUI's
    model detection about it (register_tiny_dit); returns (name, seconds spent writing)."""
    import random_checkpoints as rc
    rc.register_tiny_dit()
    path = host.base / "checkpoints" / f"tiny_{family}.safetensors"
    t = time.perf_counter()
    rc.write_checkpoint(path, rc.DIT_PRESETS[f"tiny_{family}"], seed=0, dtype=dtype)
    return path.name, time.perf_counter() - t


def build_dit_patcher(host: Host, family: str, layout: str = "full", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> Any:
    """A ModelPatcher of the Flux.1-dev / SD3.5-medium diffusion model (layout "full") or the tiny
    one, built in this process straight on the device with random weights: no checkpoint file, no
    text encoders, no VAE, and never a CPU copy of the weights (12B bf16 params are ~24 GB).

    The model config is ComfyUI's own class for the family (what its detection would pick for these
    keys: supported_models.Flux / SD3, or register_tiny_dit's subclasses for tiny widths), so the
    model_base, model_sampling and the pack's family check are those of a loaded checkpoint.
    Weights: fan-in-scaled normals, zero biases, unit norm weights (random_checkpoints._init_'s
    rule), drawn on the device from a seeded generator.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    import random_checkpoints as rc
    unet_config = rc.flux_unet_config(layout) if family == "flux" else rc.sd3_unet_config(layout)
    if layout == "tiny":
        rc.register_tiny_dit()
    config_cls = next(m for m in sm.models if m.matches(unet_config)) if layout == "tiny" else \
        {"flux": sm.Flux, "sd3": sm.SD3}[family]
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(dtype, None)
    device = mm.get_torch_device()
    model = model_config.get_model({}, "", device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in model.diffusion_model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if t.dim() >= 2:
                t.normal_(0.0, 1.0 / math.sqrt(t[0].numel()), generator=gen)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.fill_(1.0)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def pack_module(host: Host, name: str) -> ModuleType:
    """A module of this pack as ComfyUI loaded it (e.g. "rcca_core.palette"): the package name is the
    checkout's folder name, so it is read off a loaded node class."""
    import importlib
    root = host.node("RCCAAttentionPatch").__module__.split(".")[0]
    return importlib.import_module(f"{root}.{name}")


def fake_encoder(tokens: int, dim: int, seed: int = 0, scale: float = 1.0) -> Callable[[str], torch.Tensor]:
    """text -> (1, tokens, dim) float32 random embeddings, the same for the same text (seeded by a
    hash of it): a stand-in for a text encoder the benchmark does not load."""
    import zlib

    def encode(text: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(text.encode()))
        return torch.randn(1, tokens, dim, generator=gen) * scale
    return encode


def joint_palette(host: Host, family: str, regions: int, width: int, height: int, tokens: int, dim: int,
                  feather: int = 0, seed: int = 0) -> Any:
    """A palette of `regions` stripes built with rcca_core.palette.Palette.build and a fake encoder
    (random token embeddings of the family's shapes), marked as encoded by `family`'s encoders."""
    palette_mod = pack_module(host, "rcca_core.palette")
    specs = [palette_mod.RegionSpec(region_prompt(i), m[0]) for i, m in
             enumerate(stripe_masks(regions, width, height, feather))]
    return palette_mod.Palette.build(specs, BACKGROUND_PROMPT, width, height, fake_encoder(tokens, dim, seed),
                                     encoder=family)


def dit_conditioning(context: torch.Tensor, pooled: torch.Tensor, guidance: float | None = None) -> list:
    """ComfyUI conditioning [[context, {pooled_output, guidance}]]: what CLIPTextEncode (+ FluxGuidance
    when guidance is given) would put out."""
    extra: dict[str, Any] = {"pooled_output": pooled}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[context, extra]]


def set_guidance(conditioning: list, guidance: float) -> list:
    """FluxGuidance's effect (comfy_extras is not loaded here): every entry gets "guidance"."""
    import node_helpers
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})


def free_models(host: Host) -> None:
    """Unload every model ComfyUI holds and return the cached device memory."""
    import gc
    import comfy.model_management as mm
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if host.device == "cuda":
        torch.cuda.empty_cache()


# -- timing ---------------------------------------------------------------------------------

@dataclass
class RunTiming:
    step_s: list[float]   # end-of-step to end-of-step intervals (steps 2..N of one run)
    run_s: float          # the whole KSampler call, setup and model (re)load included
    steps: int
    samples: torch.Tensor
    peak_bytes: int | None = None  # torch.cuda.max_memory_allocated() over the run (StepTimer track_memory)


class CallbackClock:
    """Stamps the clock (after a device sync) at every step callback a sampler reports.

    Both KSampler and the Stream Batch LCM Sampler build their per-step callback with
    latent_preview.prepare_callback() (the stream calls it once per tick), so wrapping that
    factory gives one stamp per step or tick. Intervals between stamps are pure sampling work:
    no model loading, noise preparation or clone switching, which a whole-call time also holds.
    """

    def __init__(self, host: Host) -> None:
        import latent_preview
        self.host = host
        self._module = latent_preview
        self._original: Callable | None = None
        self._stamps: list[float] = []

    @property
    def stamps(self) -> list[float]:
        """perf_counter() at the end of every step since the last clear(), device synchronised."""
        return self._stamps

    def clear(self) -> None:
        self._stamps.clear()

    def __enter__(self) -> "CallbackClock":
        original = self._original = self._module.prepare_callback
        stamps, sync = self._stamps, self.host.sync

        def prepare_callback(model, steps, x0_output_dict=None):
            inner = original(model, steps, x0_output_dict)

            def callback(step, x0, x, total_steps):
                sync()
                stamps.append(time.perf_counter())
                inner(step, x0, x, total_steps)
            return callback

        # nodes.common_ksampler and the stream node look the factory up on the module at each call
        self._module.prepare_callback = prepare_callback
        return self

    def __exit__(self, *exc: Any) -> None:
        self._module.prepare_callback = self._original


class StepTimer(CallbackClock):
    """Times nodes.KSampler().sample() per step (see CallbackClock); also reports the whole run
    (as run_ms / steps). track_memory (CUDA only): also the peak allocated memory of every run."""

    def __init__(self, host: Host, track_memory: bool = False) -> None:
        super().__init__(host)
        self.track_memory = track_memory and host.device == "cuda"

    def __enter__(self) -> "StepTimer":
        super().__enter__()
        return self

    def sample(self, model: Any, positive: Any, negative: Any, latent: dict, steps: int, cfg: float,
               seed: int = 0, sampler: str = "euler", scheduler: str = "normal") -> RunTiming:
        """One KSampler run; euler makes exactly one model call per step."""
        self._stamps.clear()
        self.host.sync()
        if self.track_memory:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = self.host.nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]
        self.host.sync()
        run_s = time.perf_counter() - t0
        if len(self._stamps) != steps:
            raise RuntimeError(f"expected {steps} step callbacks, got {len(self._stamps)}")
        step_s = [b - a for a, b in zip(self._stamps, self._stamps[1:])]
        peak = torch.cuda.max_memory_allocated() if self.track_memory else None
        return RunTiming(step_s, run_s, steps, out["samples"], peak)


def summarize(runs: list[RunTiming]) -> dict[str, float]:
    """Median per-step ms over every interval of every run, its quartiles, and whole-run ms/step."""
    steps = sorted(s for r in runs for s in r.step_s)
    q = statistics.quantiles(steps, n=4) if len(steps) >= 2 else [steps[0]] * 3
    out = {
        "step_ms": round(1e3 * statistics.median(steps), 3),
        "step_ms_p25": round(1e3 * q[0], 3),
        "step_ms_p75": round(1e3 * q[2], 3),
        "run_ms_per_step": round(1e3 * statistics.median(r.run_s / r.steps for r in runs), 3),
        "intervals": len(steps),
    }
    if runs and all(r.peak_bytes is not None for r in runs):  # StepTimer(track_memory=True) on CUDA
        out["peak_cuda_mib"] = round(max(r.peak_bytes for r in runs) / 2**20, 1)
    return out


def compare_interleaved(timer: StepTimer, variants: dict[str, Any], positive: Any, negative: Any,
                        latent: dict, steps: int, cfg: float, repeats: int, warmup: int = 1,
                        seed: int = 0) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Time every variant (name -> MODEL) `repeats` times, interleaved, after `warmup` runs each.

    Interleaving (with the order rotated every round) spreads clock drift, thermal state and
    cache effects over all variants instead of charging them to whichever ran last.
    Returns (summary per variant, last samples per variant).
    """
    names = list(variants)
    samples: dict[str, torch.Tensor] = {}
    for _ in range(warmup):
        for name in names:  # first runs build bias/KV caches and move weights to the device
            samples[name] = timer.sample(variants[name], positive, negative, latent, steps, cfg, seed).samples
    runs: dict[str, list[RunTiming]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = timer.sample(variants[name], positive, negative, latent, steps, cfg, seed)
            runs[name].append(t)
            samples[name] = t.samples
    return {n: summarize(runs[n]) for n in names}, samples


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b > 0 and math.isfinite(a) else float("nan")


def emit_report(report: dict[str, Any], out: str | None) -> None:
    """Print a benchmark's JSON, and write it to `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
