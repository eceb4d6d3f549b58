#!/bin/bash
# Constrained requests (structured: json_schema; tools: required tool calls) at
# concurrency 1, speculation off then on, one fresh server each; spec-decode counters
# read from /metrics after each run. Run from the repository root, under the heavy lock.
set -u
OUT=benchmarks/results/spec-decode-structured-20261126
PY=/work/main/.venv/bin/python
SPEC='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
for mode in off on; do
  if [ $mode = on ]; then extra=(--speculative-config "$SPEC"); else extra=(); fi
  $PY -m pagoda serve --port 8461 "${extra[@]}" > /tmp/spec-structured-$mode.log 2>&1 &
  pid=$!
  for i in $(seq 120); do curl -sf http://127.0.0.1:8461/health >/dev/null && break; sleep 1; done
  for ds in structured tools; do
    $PY -m pagoda bench serve --base-url http://127.0.0.1:8461 --endpoint /v1/chat/completions \
      --dataset-name $ds --max-concurrency 1 --num-prompts 16 --seed 101 \
      --result-filename $OUT/$ds-$mode.json 2>&1 | tail -4
    curl -s http://127.0.0.1:8461/metrics | grep -E '^vllm:spec_decode_num_(drafts|draft_tokens|accepted_tokens)_total' \
      | sed "s/^/$ds $mode /"
  done
  kill $pid; wait $pid
done
