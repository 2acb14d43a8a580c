#!/usr/bin/env bash
# Creates .venv at the repository root with the pinned dependencies (idempotent: a stamp file
# records what was installed, so a second call costs nothing).
# Usage: scripts/setup_venv.sh [runtime|headless|dev]   (default: dev)
#   runtime  = engine only (torch, numpy, safetensors, huggingface_hub)
#   headless = runtime + bpy (Blender as a Python module) for `python -m ss4d_blender generate`
#   dev      = headless + test-only packages
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-dev}"
case "$kind" in
  runtime) req=requirements.txt ;;
  headless) req=requirements-headless.txt ;;
  dev) req=requirements-dev.txt ;;
  *) echo "unknown kind: $kind" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$kind-$(cat requirements*.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
