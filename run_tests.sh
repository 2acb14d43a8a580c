#!/usr/bin/env bash
# Sets up .venv (pinned, idempotent), checks the code with ruff (settings in pyproject.toml), and runs the
# test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh dev
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
