"""Session fixture `comfy_server`: the host's stock ComfyUI server over HTTP, with the tiny
model support pack loaded and tiny random SD1.5 / Flux / SD3 checkpoints in a temp checkpoints folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PACK_DIR / "scripts"))  # comfy_server, random_checkpoints (unique names)

from comfy_server import DEFAULT_COMFYUI, ComfyServer  # noqa: E402

COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or DEFAULT_COMFYUI).resolve()
SUPPORT_NODES = PACK_DIR / "tests" / "support"  # holds tiny_sd_pack (registers the tiny model classes)
TINY_CKPT = "tiny_sd15.safetensors"
TINY_FLUX_CKPT = "tiny_flux.safetensors"  # names random_checkpoints.py --test-set writes
TINY_SD3_CKPT = "tiny_sd3.safetensors"
DEMO_LORAS = ("rcca_demo_random_lora_a.safetensors", "rcca_demo_random_lora_b.safetensors")  # make_workflows.DEMO_LORAS


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory):
    """A running ComfyServer with `ckpt_name` (SD1.5), `flux_ckpt_name` and `sd3_ckpt_name` set;
    stopped at the end of the session."""
    if not (COMFYUI_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI_DIR}: run `bash scripts/test.sh` (builds .host/) "
                    "or set COMFYUI_DIR", pytrace=False)
    ckpts = tmp_path_factory.mktemp("server_checkpoints")
    # a child process builds it, so this test process need not import torch/ComfyUI at all
    r = subprocess.run([sys.executable, str(PACK_DIR / "scripts" / "random_checkpoints.py"),
                        "--comfyui", str(COMFYUI_DIR), "--test-set", str(ckpts)], capture_output=True, text=True)
    if r.returncode or not all((ckpts / n).is_file() for n in (TINY_CKPT, TINY_FLUX_CKPT, TINY_SD3_CKPT)):
        pytest.fail(f"building the tiny checkpoints failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}", pytrace=False)
    # the region-LoRA example's LoRA names, random files built for the tiny SD1.5 checkpoint
    loras = tmp_path_factory.mktemp("server_loras")
    r = subprocess.run([sys.executable, str(PACK_DIR / "scripts" / "random_lora.py"), "--comfyui", str(COMFYUI_DIR),
                        str(ckpts / TINY_CKPT), *(str(loras / n) for n in DEMO_LORAS)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"building the random LoRAs failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}", pytrace=False)
    # the server runs on this interpreter (the host venv under scripts/test.sh)
    srv = ComfyServer(checkpoints_dir=ckpts, custom_nodes_dirs=[SUPPORT_NODES], comfyui_dir=COMFYUI_DIR,
                      python=sys.executable, workdir=tmp_path_factory.mktemp("server"), loras_dir=loras)
    srv.ckpt_name = TINY_CKPT
    srv.flux_ckpt_name = TINY_FLUX_CKPT
    srv.sd3_ckpt_name = TINY_SD3_CKPT
    with srv:
        yield srv
