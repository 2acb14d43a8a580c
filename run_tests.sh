#!/usr/bin/env bash
# Sets up .venv (pinned, idempotent) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh dev
exec .venv/bin/python -m pytest -q "$@"
