#!/usr/bin/env bash
# Sets everything up, then runs Pagoda on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/pagoda generate "The capital of France is" "$@"
