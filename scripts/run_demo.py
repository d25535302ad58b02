"""Main job: start ComfyUI on 127.0.0.1, queue an example RCCA workflow through the HTTP API,
save the image(s), print where, stop the server. Run by scripts/demo.sh with the host's python.

  --ckpt PATH   a checkpoint file anywhere (its folder is added to ComfyUI's checkpoint paths)
  --ckpt NAME   a checkpoint already in the host's ComfyUI/models/checkpoints
  (none)        builds a random-weight SD1.5-layout checkpoint: the image is noise, not a picture
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


def resolve_checkpoint(ckpt: str | None) -> tuple[Path, str, bool]:
    """(checkpoints folder, ckpt_name, is_random)."""
    if ckpt is None:
        if not RANDOM_CKPT.is_file():
            RANDOM_CKPT.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(PACK / "scripts" / "random_checkpoints.py"), "--preset", "stock",
                            str(RANDOM_CKPT)], check=True)
        return RANDOM_CKPT.parent, RANDOM_CKPT.name, True
    path = Path(ckpt).expanduser()
    if path.is_file():
        return path.resolve().parent, path.name, False
    host_ckpts = DEFAULT_COMFYUI / "models" / "checkpoints"
    if (host_ckpts / ckpt).is_file():
        return host_ckpts, ckpt, False
    raise SystemExit(f"checkpoint {ckpt!r} not found: give a path to a .safetensors/.ckpt file, "
                     f"or the name of a file in {host_ckpts}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render an example rcca-palette workflow through ComfyUI's HTTP API.")
    ap.add_argument("--ckpt", help="checkpoint path or name (default: a random-weight SD1.5-layout checkpoint)")
    # the live workflow streams to a browser tab, so it is not a command-line demo
    ap.add_argument("--workflow", choices=sorted(p.stem for p in WORKFLOWS.glob("*.json") if p.stem != "rcca_live_drawing"),
                    help="default: rcca_regions_euler with a real checkpoint, rcca_regions_lcm with random weights")
    ap.add_argument("--steps", type=int, help="override the workflow's sampler steps")
    ap.add_argument("--seed", type=int, help="override the workflow's seed")
    ap.add_argument("--out", default=str(PACK / "output"), help="where to copy the images (default: ./output)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the image")
    a = ap.parse_args(argv)

    folder, ckpt_name, is_random = resolve_checkpoint(a.ckpt)
    workflow = a.workflow or ("rcca_regions_lcm" if is_random else "rcca_regions_euler")
    prompt = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt_name
        if node["class_type"] in ("KSampler", "BasicScheduler") and a.steps:
            node["inputs"]["steps"] = a.steps
        for key in ("seed", "noise_seed"):
            if key in node["inputs"] and a.seed is not None:
                node["inputs"][key] = a.seed

    print(f"[demo] workflow {workflow}, checkpoint {ckpt_name}", flush=True)
    t0 = time.time()
    with ComfyServer(checkpoints_dir=folder) as server:
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
        print("[demo] NOTE: no --ckpt given, so the model has random weights: the image is noise, not a picture.\n"
              "[demo]       Pass --ckpt /path/to/an/sd15-checkpoint.safetensors to render a real one.")
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(main())
