#!/usr/bin/env bash
# Command (a): set up the host if missing, then render an example workflow through ComfyUI's HTTP API.
#   usage: bash scripts/demo.sh [--ckpt PATH_OR_NAME] [--workflow NAME] [--steps N] [--seed N] [--out DIR]
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
bash "$PACK/scripts/setup_host.sh" >&2
exec "$PACK/.host/venv/bin/python" "$PACK/scripts/run_demo.py" "$@"
