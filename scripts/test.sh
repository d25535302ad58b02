#!/usr/bin/env bash
# Build (or reuse) the ComfyUI host in .host/, then run the whole pytest suite with its python.
#   usage: bash scripts/test.sh [pytest args...]      e.g. bash scripts/test.sh tests/server -q
# Exits with pytest's code (5 = no tests collected, which is a failure too).
set -euo pipefail
PACK=$(cd "$(dirname "$0")/.." && pwd)
cd "$PACK"
bash scripts/setup_host.sh
# the browser tests need Debian's Chromium and Playwright; RCCA_SKIP_BROWSER=1 skips installing them
# (tests/browser then skips, saying why)
if [ "${RCCA_SKIP_BROWSER:-0}" != 1 ]; then bash scripts/setup_browser.sh; fi
# default prepend import mode: tests/ has no __init__.py files, so no test module is ever imported as
# part of a package named `tests` (ComfyUI has one); each test folder goes on sys.path by itself
exec "$PACK/.host/venv/bin/python" -m pytest --rootdir="$PACK" "$@"
