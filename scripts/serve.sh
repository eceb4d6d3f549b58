#!/usr/bin/env bash
# Sets everything up, then serves the embedded default model on http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/pagoda serve --host 127.0.0.1 "$@"
