"""A KV cache smaller than the model's context: the context shrinks to fit, or startup fails."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

# The default model in float32 (the servers' dtype here) keeps 45 KiB a token, 720 KiB a
# block of 16: 8 MiB is 11 blocks, 176 tokens (its own context is 8192).
SMALL_CACHE = "8M"
CAPACITY = 176


def test_context_lowered_to_the_cache_and_requests_that_cannot_fit_refused(
    start_server,
) -> None:
    server = start_server("--kv-cache-memory", SMALL_CACHE)
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["data"][0]["max_model_len"] == CAPACITY
    url = f"{server.url}/v1/completions"

    # A prompt longer than the cache, and a generation that would outgrow it: 400s.
    long = httpx.post(url, json={"prompt": "hello world " * 108, "max_tokens": 5}, timeout=30)
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt"
    grow = httpx.post(url, json={"prompt": "Hello", "max_tokens": 500}, timeout=30)
    assert grow.status_code == 400 and grow.json()["error"]["param"] == "max_tokens"

    # The longest request that fits the context fits the cache, and ends by length.
    one = httpx.post(url, json={"prompt": "Hello", "max_tokens": 1}, timeout=30).json()
    room = CAPACITY - one["usage"]["prompt_tokens"]
    full = httpx.post(
        url,
        json={"prompt": "Hello", "max_tokens": room, "ignore_eos": True, "temperature": 0},
        timeout=300,
    ).json()
    assert full["choices"][0]["finish_reason"] == "length"
    assert full["usage"]["total_tokens"] == CAPACITY
    assert server.metric("vllm:num_preemptions_total") == 0


def test_explicit_context_longer_than_the_cache_fails_at_startup(start_server) -> None:
    server = start_server("--kv-cache-memory", SMALL_CACHE, "--max-model-len", "8192", wait=False)
    assert server.process.wait(timeout=120) != 0
    log = server.log.read_text()
    assert "--max-model-len 8192" in log and f"largest that fits is {CAPACITY}" in log
