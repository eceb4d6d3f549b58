#!/usr/bin/env bash
# Sets everything up, then lints and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy pagoda/
.venv/bin/python -m pytest "$@"
