"""Main job: start ComfyUI on 127.0.0.1, queue an example RCCA workflow through the HTTP API,
save the image(s), print where, stop the server. Run by scripts/demo.sh with the host's python.

  --ckpt PATH   a checkpoint file anywhere (its folder is added to ComfyUI's checkpoint paths)
  --ckpt NAME   a checkpoint already in the host's ComfyUI/models/checkpoints
  (none)        builds a random-weight checkpoint of the workflow's family: the image is noise, not a picture

The SD1.5 workflows take an SD1.5 checkpoint. rcca_regions_flux / rcca_regions_sd3 take a Flux.1 /
SD3-3.5 all-in-one checkpoint (diffusion model, text encoders and VAE in one file); without --ckpt
they get a tiny random-weight Flux / SD3 checkpoint (scripts/random_checkpoints.py tiny_flux /
tiny_sd3), rendered small and with few steps. ComfyUI's stock detection does not know those tiny
widths, so only then the server also loads the test-support custom node tests/support/tiny_sd_pack
(it registers the tiny model classes and adds no nodes; the host's ComfyUI stays unmodified).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK / "scripts"))

from comfy_server import DEFAULT_COMFYUI, ComfyServer  # noqa: E402

RANDOM_CKPT = PACK / ".host" / "models" / "rcca_demo_random_sd15.safetensors"
WORKFLOWS = PACK / "example_workflows" / "api"
RANDOM_LORAS = PACK / ".host" / "models" / "loras"  # random region LoRAs per checkpoint, for rcca_regional_lora
# workflows for the MMDiT families: family -> (random checkpoint, random_checkpoints.py preset)
DIT_WORKFLOWS = {"rcca_regions_flux": "flux", "rcca_regions_sd3": "sd3"}
RANDOM_DIT_CKPTS = {"flux": (PACK / ".host" / "models" / "rcca_demo_random_flux.safetensors", "tiny_flux"),
                    "sd3": (PACK / ".host" / "models" / "rcca_demo_random_sd3.safetensors", "tiny_sd3")}
TINY_SUPPORT_NODES = PACK / "tests" / "support"  # holds tiny_sd_pack: registers the tiny random model classes
RANDOM_DIT_STEPS = 4    # random weights: the picture is noise anyway, keep the CPU run short
RANDOM_DIT_SIZE = 256   # instead of the workflow's 1024 px


def _build_random(path: Path, *args: str) -> None:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(PACK / "scripts" / "random_checkpoints.py"), *args, str(path)], check=True)


def resolve_checkpoint(ckpt: str | None, family: str = "sd15") -> tuple[Path, str, bool]:
    """(checkpoints folder, ckpt_name, is_random)."""
    if ckpt is None:
        if family in RANDOM_DIT_CKPTS:
            path, preset = RANDOM_DIT_CKPTS[family]
            _build_random(path, "--preset", preset, "--dtype", "fp32")
            return path.parent, path.name, True
        _build_random(RANDOM_CKPT, "--preset", "stock")
        return RANDOM_CKPT.parent, RANDOM_CKPT.name, True
    path = Path(ckpt).expanduser()
    if path.is_file():
        return path.resolve().parent, path.name, False
    host_ckpts = DEFAULT_COMFYUI / "models" / "checkpoints"
    if (host_ckpts / ckpt).is_file():
        return host_ckpts, ckpt, False
    raise SystemExit(f"checkpoint {ckpt!r} not found: give a path to a .safetensors/.ckpt file, "
                     f"or the name of a file in {host_ckpts}")


def scale_size(prompt: dict, size: int) -> None:
    """Render at `size` px instead of the workflow's own: every width / height input (masks,
    palette, latent) scales by the same factor, so the regions keep their layout."""
    native = max(n["inputs"]["width"] for n in prompt.values()
                 if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"))
    for node in prompt.values():
        for key in ("width", "height"):
            if isinstance(node["inputs"].get(key), int):
                node["inputs"][key] = max(16, round(node["inputs"][key] * size / native / 16) * 16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render an example rcca-palette workflow through ComfyUI's HTTP API.")
    ap.add_argument("--ckpt", help="checkpoint path or name (default: a random-weight checkpoint of the workflow's "
                    "family: SD1.5 layout, or tiny Flux / SD3 for rcca_regions_flux / rcca_regions_sd3)")
    # the live workflow streams to a browser tab, so it is not a command-line demo
    ap.add_argument("--workflow", choices=sorted(p.stem for p in WORKFLOWS.glob("*.json") if p.stem != "rcca_live_drawing"),
                    help="default: rcca_regions_euler with a real checkpoint, rcca_regions_lcm with random weights; "
                         "rcca_regions_flux / rcca_regions_sd3 for Flux.1 / SD3-3.5")
    ap.add_argument("--steps", type=int, help="override the workflow's sampler steps")
    ap.add_argument("--seed", type=int, help="override the workflow's seed")
    ap.add_argument("--size", type=int, help="render at this many px (the regions scale along); default: the "
                    f"workflow's own, {RANDOM_DIT_SIZE} for random-weight Flux / SD3")
    ap.add_argument("--out", default=str(PACK / "output"), help="where to copy the images (default: ./output)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the image")
    a = ap.parse_args(argv)

    family = DIT_WORKFLOWS.get(a.workflow, "sd15")
    folder, ckpt_name, is_random = resolve_checkpoint(a.ckpt, family)
    workflow = a.workflow or ("rcca_regions_lcm" if is_random else "rcca_regions_euler")
    prompt = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    random_dit = is_random and family != "sd15"
    steps = a.steps or (RANDOM_DIT_STEPS if random_dit else None)
    size = a.size or (RANDOM_DIT_SIZE if random_dit else None)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt_name
        if node["class_type"] in ("KSampler", "BasicScheduler") and steps:
            node["inputs"]["steps"] = steps
        for key in ("seed", "noise_seed"):
            if key in node["inputs"] and a.seed is not None:
                node["inputs"][key] = a.seed

    if size:
        scale_size(prompt, size)
    custom_nodes = []
    if random_dit:
        if not (TINY_SUPPORT_NODES / "tiny_sd_pack" / "__init__.py").is_file():
            raise SystemExit(f"{TINY_SUPPORT_NODES / 'tiny_sd_pack'} is missing: the tiny random {family} checkpoint "
                             "needs it; pass --ckpt with a real checkpoint instead")
        custom_nodes = [TINY_SUPPORT_NODES]
        print(f"[demo] random weights: tiny {family} checkpoint {folder / ckpt_name}; the server also loads the "
              f"test-support custom node {TINY_SUPPORT_NODES / 'tiny_sd_pack'} (extra custom_nodes path) so ComfyUI's "
              "detection accepts its tiny widths; the host's ComfyUI is not modified", flush=True)
    shown_steps = next((n["inputs"]["steps"] for n in prompt.values() if n["class_type"] in ("KSampler", "BasicScheduler")), "?")
    shown_size = next((n["inputs"]["width"] for n in prompt.values()
                       if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage")), "?")
    print(f"[demo] workflow {workflow}, checkpoint {ckpt_name}, {shown_steps} steps, {shown_size} px", flush=True)
    loras = sorted({n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "RCCARegionLoRA"})
    loras_dir = None
    if loras:
        # the example's LoRAs are random-weight files built for this checkpoint: they show where each
        # region's LoRA acts, not a style; load your own LoRAs in the UI
        loras_dir = RANDOM_LORAS / Path(ckpt_name).stem
        missing = [str(loras_dir / name) for name in loras if not (loras_dir / name).is_file()]
        if missing:
            subprocess.run([sys.executable, str(PACK / "scripts" / "random_lora.py"), str(folder / ckpt_name), *missing],
                           check=True)
        print(f"[demo] region LoRAs: random-weight files {', '.join(loras)} in {loras_dir}", flush=True)
    t0 = time.time()
    with ComfyServer(checkpoints_dir=folder, custom_nodes_dirs=custom_nodes, loras_dir=loras_dir) as server:
        print(f"[demo] ComfyUI at {server.url} (log: {server.log_path})", flush=True)
        entry = server.run(prompt, timeout=a.timeout)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        saved = []
        for image in server.outputs_images(entry):
            target = out / image.name
            shutil.copy2(image, target)
            saved.append(target)
    print(f"[demo] done in {time.time() - t0:.0f}s; server stopped")
    for path in saved:
        print(f"[demo] image: {path}")
    if is_random:
        example = {"sd15": "an/sd15-checkpoint.safetensors",
                   "flux": "a/flux1-dev-all-in-one-checkpoint.safetensors (model, CLIP-L + T5, VAE in one file)",
                   "sd3": "an/sd3.5-all-in-one-checkpoint.safetensors (model, CLIP-L/G + T5, VAE in one file)"}[family]
        print("[demo] NOTE: no --ckpt given, so the model has random weights: the image is noise, not a picture.\n"
              f"[demo]       Pass --ckpt /path/to/{example} to render a real one.")
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(main())
