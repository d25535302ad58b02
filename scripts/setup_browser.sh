#!/usr/bin/env bash
# Install what the browser tests (tests/browser) need: Debian's Chromium and the Playwright Python
# client in the host venv. Idempotent; run as root on Debian/Ubuntu (CI does, after setup_host.sh).
#   usage: scripts/setup_browser.sh [HOST_DIR]      (default: .host/ in the pack)
#   env:   PLAYWRIGHT_VERSION, NEWEST_FRONTEND (defaults below)
#
# Besides ComfyUI's pinned frontend, the browser tests run against NEWEST_FRONTEND, the newest
# comfyui-frontend-package checked: installed without dependencies into HOST_DIR/frontends/<version>
# (ComfyUI's own venv is untouched) and served with --front-end-root. This is the one place its
# version is pinned; tests/browser finds every frontend installed there.
#
# Playwright drives the system browser through executable_path=/usr/bin/chromium, so its own
# browser download (`playwright install`) is never run: the machine reaches package registries only.
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
T=${1:-$PACK/.host}
V="$T/venv"
PLAYWRIGHT_VERSION=${PLAYWRIGHT_VERSION:-1.65.2}
NEWEST_FRONTEND=${NEWEST_FRONTEND:-1.58.1}
log() { echo "[setup_browser $(date +%T)] $*"; }

# --- 1. Chromium from Debian (skipped when already installed) ---
if [ ! -x /usr/bin/chromium ]; then
  if ! command -v apt-get >/dev/null; then
    echo "setup_browser: /usr/bin/chromium is missing and apt-get is not available; install Chromium yourself" >&2
    exit 1
  fi
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  log "installing chromium with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
log "$(/usr/bin/chromium --version 2>/dev/null || echo 'chromium: version unknown')"

# --- 2. Playwright (Python client + its bundled node driver) into the host venv ---
if [ ! -x "$V/bin/python" ]; then
  echo "setup_browser: no host venv at $V: run scripts/setup_host.sh first" >&2
  exit 1
fi
if ! "$V/bin/python" -c "import playwright.sync_api" 2>/dev/null; then
  log "installing playwright==$PLAYWRIGHT_VERSION into $V"
  "$V/bin/pip" install -q --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION"
fi
log "playwright $("$V/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))') ready"

# --- 3. the newest frontend package, beside the pinned one ---
FE="$T/frontends/$NEWEST_FRONTEND"
if [ ! -f "$FE/comfyui_frontend_package/static/index.html" ]; then
  log "installing comfyui-frontend-package==$NEWEST_FRONTEND into $FE"
  rm -rf "$FE"
  "$V/bin/pip" install -q --disable-pip-version-check --no-deps --target "$FE" "comfyui-frontend-package==$NEWEST_FRONTEND"
fi
log "frontend $NEWEST_FRONTEND ready in $FE"
