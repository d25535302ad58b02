#!/usr/bin/env bash
# Full SD1.5-architecture benchmarks on a CUDA machine with no ComfyUI install and no network: they
# use that machine's own torch and a ComfyUI source tree copied along with the pack.
#
# usage: bash bench/gpu_run.sh [ksampler|stream|joint|lora|all] [COMFYUI_DIR] [WHEELS_DIR] [-- extra benchmark args]
#   ksampler     bench/ksampler_patch_overhead.py (RCCA patch overhead per KSampler step)
#   stream       bench/stream_fps.py (Stream Batch LCM Sampler frames/s; adds --compile, see below)
#   joint        bench/joint_patch_overhead.py (RCCA patch overhead on Flux.1-dev and SD3.5-medium
#                diffusion models, full layouts at 1024 x 1024 bf16, built in-process: no checkpoint, no CKPT)
#   lora         bench/region_lora_overhead.py (region LoRAs in RCCA's single pass vs no LoRA, a global LoRA
#                and ComfyUI's hook-based regional LoRA; full SD1.5 at 512 x 512 fp16, shares CKPT)
#   all          ksampler then stream (the default; joint and lora are not part of it); extra args need a single benchmark
#   COMFYUI_DIR  ComfyUI 0.3.75 tree (default: <pack>/.host/ComfyUI, carried along with the pack)
#   WHEELS_DIR   optional folder of wheels installed offline with --no-deps (see bench/README.md)
# env: PYTHON (default python3), DEVICE (default cuda; cpu only to dry-run this script), RESULTS_DIR (default <pack>/bench/results), CKPT (checkpoint path,
#      written once from the full preset if missing; default /tmp/rcca_bench_full_sd15.safetensors; both benchmarks share it)
#
# Prints each benchmark's JSON on stdout and writes it to $RESULTS_DIR/<benchmark>_gpu.json
# (ksampler_patch_overhead_gpu.json, stream_fps_gpu.json, joint_patch_overhead_gpu.json,
# region_lora_overhead_gpu.json).
# Dry run on CPU: DEVICE=cpu RESULTS_DIR=/tmp/r bash bench/gpu_run.sh joint -- --layout tiny --threads 1
set -euo pipefail

PACK=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
COMFY=$PACK/.host/ComfyUI
WHEELS=""
BENCH=all
# the benchmark name is optional, so `gpu_run.sh COMFYUI_DIR ...` keeps working as before
case ${1:-} in ksampler|stream|joint|lora|all) BENCH=$1; shift ;; esac
if [[ $# -gt 0 && $1 != "--" ]]; then COMFY=$1; shift; fi
if [[ $# -gt 0 && $1 != "--" ]]; then WHEELS=$1; shift; fi
if [[ $# -gt 0 && $1 == "--" ]]; then shift; fi
if [[ $# -gt 0 && $BENCH == all ]]; then
    echo "gpu_run.sh: extra arguments go to one benchmark; name it (ksampler, stream, joint or lora) first" >&2; exit 2
fi
COMFY=$(cd "$COMFY" && pwd)
[[ -f $COMFY/nodes.py ]] || { echo "gpu_run.sh: no ComfyUI at $COMFY" >&2; exit 2; }

SITE=$(mktemp -d /tmp/rcca_bench_site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT

# 1. Wheels carried in a folder, installed offline without dependency resolution, into a private
#    dir so the machine's own packages stay untouched. What ComfyUI needs on this code path and a
#    bare torch image may lack: torchsde (+ its dependency trampoline) and av (PyAV).
if [[ -n $WHEELS ]]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} )); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
    fi
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 2. Import-only stubs for modules ComfyUI imports at load time but this benchmark never calls:
#    av (video I/O types in comfy_api) and torchsde (SDE samplers; we sample with euler). Only
#    written when the real module cannot be imported; the JSON lists them in environment.import_stubs.
"$PY" - "$SITE" <<'EOF'
import importlib, os, sys
site = sys.argv[1]
STUB = "__rcca_bench_stub__ = True\n"
RAISE = ("def __getattr__(name):\n"
         "    raise ImportError(f'{__name__} is an import-only stub of bench/gpu_run.sh; {name} is unavailable')\n")
stubs = {
    "av": {"__init__.py": STUB + "def open(*args, **kwargs):\n    raise ImportError('av is a stub')\n" + RAISE,
           "container/__init__.py": STUB + "class InputContainer: ...\n",
           "subtitles/__init__.py": STUB,
           "subtitles/stream.py": STUB + "class SubtitleStream: ...\n"},
    "torchsde": {"__init__.py": STUB + RAISE},
}
for mod, files in stubs.items():
    try:
        importlib.import_module(mod)
        continue
    except ImportError:
        pass
    for rel, text in files.items():
        path = os.path.join(site, mod, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print(f"gpu_run.sh: {mod} not installed; using an import-only stub", file=sys.stderr)
EOF

# 3. Fail early, with names, on anything else missing from ComfyUI's import path.
"$PY" - <<'EOF'
import importlib, sys
need = ["torch", "numpy", "safetensors", "einops", "scipy", "yaml", "psutil", "tqdm", "PIL",
        "transformers", "tokenizers", "av", "torchsde"]
missing = []
for m in need:
    try:
        importlib.import_module(m)
    except Exception as e:  # a broken install counts as missing too
        missing.append(f"{m} ({e.__class__.__name__}: {e})")
if missing:
    sys.exit("gpu_run.sh: missing Python modules: " + "; ".join(missing))
EOF

RESULTS_DIR=${RESULTS_DIR:-$PACK/bench/results}
mkdir -p "$RESULTS_DIR"
export PYTHONUNBUFFERED=1
# full preset at 512 x 512; the checkpoint is written in fp16 and ComfyUI runs the UNet in fp16 on
# CUDA (the JSON's unet_dtype says what it chose). No exec: the EXIT trap removes $SITE afterwards.
common=(--device "${DEVICE:-cuda}" --preset full --size 512 --comfyui "$COMFY"
        --ckpt "${CKPT:-/tmp/rcca_bench_full_sd15.safetensors}")
if [[ $BENCH == ksampler || $BENCH == all ]]; then
    "$PY" "$PACK/bench/ksampler_patch_overhead.py" "${common[@]}" \
        --out "$RESULTS_DIR/ksampler_patch_overhead_gpu.json" "$@"
fi
if [[ $BENCH == stream || $BENCH == all ]]; then
    # --compile: the targets include a torch.compile (CUDA graphs) figure; --no-compile drops it
    "$PY" "$PACK/bench/stream_fps.py" "${common[@]}" --compile \
        --out "$RESULTS_DIR/stream_fps_gpu.json" "$@"
fi
if [[ $BENCH == joint ]]; then
    # full Flux.1-dev (12B) and SD3.5-medium diffusion models with random bf16 weights, built on the
    # device one family at a time (peak ~24 GB of weights plus the attention biases); extra args
    # after -- override these (e.g. -- --family flux, -- --layout tiny for a CPU dry run)
    "$PY" "$PACK/bench/joint_patch_overhead.py" --device "${DEVICE:-cuda}" --layout full --family both \
        --comfyui "$COMFY" --out "$RESULTS_DIR/joint_patch_overhead_gpu.json" "$@"
fi
if [[ $BENCH == lora ]]; then
    # P = 4 stripes; 0 / 1 / 2 / 4 region LoRAs (random rank 16, written to a temp loras folder) vs the
    # unpatched model, one global LoRA and ComfyUI's hook LoRAs (CreateHookLoraModelOnly + masked conds)
    "$PY" "$PACK/bench/region_lora_overhead.py" "${common[@]}" \
        --out "$RESULTS_DIR/region_lora_overhead_gpu.json" "$@"
fi
