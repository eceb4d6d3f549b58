#!/bin/bash
# Served runs: Pagoda before (base tree, spec on, old defaults), off and on (this tree), vLLM with ngram.
OUT=/tmp/spec/res
SPEC='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
PY=/work/main/.venv/bin/python
CLIENT="env PYTHONPATH=/work/wt/spec $PY -m pagoda bench serve"
wait_ready() {  # url, seconds
  for i in $(seq 1 $2); do curl -sf $1/health >/dev/null 2>&1 && return 0; sleep 1; done; return 1
}
workloads() {  # label url model
  local L=$1 U=$2 M=$3
  $CLIENT --base-url $U --model $M --endpoint /v1/chat/completions --dataset-name copy --max-concurrency 1 --num-prompts 8 --seed 7 --disable-tqdm --label $L-copy-c1 --result-filename $OUT/$L-copy-c1.json | grep -v '^{'
  $CLIENT --base-url $U --model $M --endpoint /v1/chat/completions --dataset-name copy --max-concurrency 8 --num-prompts 16 --seed 7 --disable-tqdm --label $L-copy-c8 --result-filename $OUT/$L-copy-c8.json | grep -v '^{'
  if [ "$4" != "copyonly" ]; then
  $CLIENT --base-url $U --model $M --dataset-name random --max-concurrency 1 --num-prompts 16 --seed 1001 --ignore-eos --temperature 1 --disable-tqdm --label $L-rand-t1-c1 --result-filename $OUT/$L-rand-t1-c1.json | grep -v '^{'
  $CLIENT --base-url $U --model $M --dataset-name random --max-concurrency 8 --num-prompts 32 --seed 1008 --ignore-eos --temperature 1 --disable-tqdm --label $L-rand-t1-c8 --result-filename $OUT/$L-rand-t1-c8.json | grep -v '^{'
  fi
  curl -s $U/metrics | grep -E "^vllm:spec_decode_num_(draft_tokens|accepted_tokens)(_total)? " 
}
pagoda() {  # label tree [spec]
  local L=$1 T=$2
  if [ -n "$3" ]; then
    (cd $T && PYTHONPATH=$T exec $PY -m pagoda serve --port 8451 --speculative-config "$3" > $OUT/$L-server.log 2>&1) &
  else
    (cd $T && PYTHONPATH=$T exec $PY -m pagoda serve --port 8451 > $OUT/$L-server.log 2>&1) &
  fi
  local P=$!
  wait_ready http://127.0.0.1:8451 90 || echo "$L: not ready"
  workloads $L http://127.0.0.1:8451 $($PY - <<'P'
import json, urllib.request; print(json.load(urllib.request.urlopen("http://127.0.0.1:8451/v1/models"))["data"][0]["id"])
P
)
  kill -INT $P; wait $P 2>/dev/null; sleep 2
}
date -u; cd /work/wt/spec; git log --oneline -1
pagoda off /work/wt/spec
pagoda on /work/wt/spec "$SPEC"
pagoda before /tmp/spec/base "$SPEC"
date -u
if [ "$VLLM" = 1 ]; then
  PORT=8100 timeout 300 /work/shared/anchors/serve-vllm.sh --speculative-config "$SPEC" > $OUT/vllm-server.log 2>&1 &
  VP=$!
  if wait_ready http://127.0.0.1:8100 150; then
    workloads vllm-ngram http://127.0.0.1:8100 smollm2 copyonly
  else
    echo "vLLM with ngram not ready; log tail:"; tail -30 $OUT/vllm-server.log
  fi
  kill -INT $VP 2>/dev/null; sleep 3; kill $VP 2>/dev/null; wait $VP 2>/dev/null
  date -u
fi
