"""--kv-cache-dtype bfloat16 under a float32 model: twice the tokens in the same memory, and
greedy outputs that still do not change with batch composition, chunking or caching."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.model.layers.attention import Attention
from pagoda.model.runner import kv_bytes_per_block
from pagoda.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "A list of fruits: apple, banana,",
    "Roses are red, violets are blue,",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
MEMORY = 64 << 20


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_dtype="bfloat16", kv_cache_memory=MEMORY)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_the_cache_is_bfloat16_and_holds_twice_the_blocks(llm: LLM) -> None:
    runner = llm.engine.runner
    assert runner.dtype == torch.float32
    assert runner.kv_cache_dtype == torch.bfloat16
    caches = [c for m in runner.model.modules() if isinstance(m, Attention) for c in m.kv_cache]
    assert caches and all(c.dtype == torch.bfloat16 for c in caches)
    float32_blocks = MEMORY // kv_bytes_per_block(runner.spec, runner.block_size, torch.float32)
    assert runner.num_blocks == 2 * float32_blocks


def test_the_continuation_is_still_coherent(llm: LLM) -> None:
    (out,) = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out.outputs[0].text


def test_batching_and_chunking_do_not_change_greedy_tokens(llm: LLM) -> None:
    alone = [tokens(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in PROMPTS]
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone
    scheduler = llm.engine.scheduler
    config = scheduler.config
    scheduler.config = dataclasses.replace(config, max_num_batched_tokens=7)
    try:
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone
    finally:
        scheduler.config = config
