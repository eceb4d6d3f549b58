#!/usr/bin/env bash
# Offline throughput, Pagoda then vLLM's CPU build, same settings, one after the other:
# random prompts, 256 input / 128 output tokens, 64 prompts, seed 0.
#   benchmarks/compare_throughput.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
ANCHORS=${ANCHORS:-$HOME/.cache/pagoda-anchors}
mkdir -p "$OUT"
.venv/bin/pagoda bench throughput --input-len 256 --output-len 128 --num-prompts 64 --seed 0 \
  --output-json "$OUT/throughput-pagoda.json" 2>/dev/null | grep '^Throughput'
# vLLM as ../shared/anchors/serve-vllm.sh runs it: both cores, tcmalloc and Intel OpenMP.
VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 \
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$ANCHORS/venv/lib/libiomp5.so \
  "$ANCHORS/venv/bin/vllm" bench throughput --model "$ANCHORS/smollm2-135m-instruct" \
  --dataset-name random --random-input-len 256 --random-output-len 128 --num-prompts 64 \
  --seed 0 --output-json "$OUT/throughput-vllm.json" 2>/dev/null | grep '^Throughput'
