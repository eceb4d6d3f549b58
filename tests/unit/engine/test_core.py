"""EngineCore's context length against the KV cache it was given, on a tiny model."""

from __future__ import annotations

import logging

import pytest

from pagoda.config import ConfigError
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams

# The tiny llama in float32: 2 layers x 2 KV heads x 16 dims x K and V x 4 bytes = 512 bytes
# a token, 8 KiB a block of 16; 64 KiB is 8 blocks, 128 tokens (its own context is 512).
SMALL_CACHE = 64 << 10
CAPACITY = 128


def test_context_is_lowered_to_what_the_cache_holds(tiny_model_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(tiny_model_dir()), dtype="float32", kv_cache_memory=SMALL_CACHE)
    assert llm.max_model_len == CAPACITY
    assert "--max-model-len" in caplog.text and str(CAPACITY) in caplog.text

    # The longest request the context allows fits the cache alone: it ends by length.
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=None)
    (out,) = llm.generate([list(range(100, 200))], params, use_tqdm=False)
    assert out.outputs[0].finish_reason == "length"
    assert 100 + len(out.outputs[0].token_ids) == CAPACITY
    assert llm.engine.scheduler.num_preemptions == 0
    with pytest.raises(ValueError, match=str(CAPACITY)):
        llm.generate([list(range(100, 100 + CAPACITY))], params, use_tqdm=False)


def test_explicit_context_longer_than_the_cache_is_an_error(tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match=rf"--max-model-len.*\b{CAPACITY}\b"):
        LLM(
            str(tiny_model_dir()),
            dtype="float32",
            kv_cache_memory=SMALL_CACHE,
            max_model_len=CAPACITY + 1,
        )
    llm = LLM(
        str(tiny_model_dir()), dtype="float32", kv_cache_memory=SMALL_CACHE, max_model_len=CAPACITY
    )
    assert llm.max_model_len == CAPACITY


def test_explicit_context_longer_than_the_model_is_an_error(tiny_model_dir) -> None:
    with pytest.raises(ConfigError, match=r"--max-model-len.*\b512\b"):
        LLM(str(tiny_model_dir()), dtype="float32", max_model_len=513)
