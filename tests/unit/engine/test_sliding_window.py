"""The offline engine on a tiny Gemma 3: batching, chunking, prefix caching and preemption
never change greedy tokens of a model whose local layers see only the last 6 positions."""

from __future__ import annotations

import pytest
import torch

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.scheduler import Scheduler
from pagoda.engine.llm import LLM
from pagoda.sampling_params import SamplingParams

BLOCK_SIZE = 4
SHARED = torch.randint(3, 256, (18,), generator=torch.Generator().manual_seed(0)).tolist()
PROMPTS = [
    torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (3, 7, 13, 29, 41)
] + [SHARED + [5, 6], SHARED + [7], SHARED[:13] + [9, 9, 9]]  # prefix hits past the window
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(
        str(tiny_model_dir("gemma3")),
        dtype="float32",
        block_size=BLOCK_SIZE,
        kv_cache_memory=1 << 21,
        max_model_len=64,
    )


def reset_scheduler(
    llm: LLM, *, num_blocks: int | None = None, caching: bool = True, budget: int = 2048
) -> None:
    """A fresh scheduler (and block pool) over the same loaded model."""
    llm.engine.scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=budget),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=caching),
        num_blocks or llm.engine.runner.num_blocks,
        llm.max_model_len,
    )


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(llm: LLM) -> list[list[int]]:
    reset_scheduler(llm, caching=False)
    return [tokens(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]


@pytest.mark.parametrize("setting", ["together", "chunked", "no-prefix-cache", "preempted"])
def test_batching_does_not_change_greedy_tokens(llm: LLM, alone, setting: str) -> None:
    kwargs = {
        "together": {},
        "chunked": {"budget": 5},
        "no-prefix-cache": {"caching": False},
        "preempted": {"num_blocks": 20},
    }[setting]
    reset_scheduler(llm, **kwargs)
    hits_before = llm.engine.scheduler.kv.prefix_stats.hits
    together = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert together == alone
    llm.engine.check_invariants()
    if setting == "preempted":
        assert llm.engine.scheduler.num_preemptions > 0
    if setting in ("together", "chunked"):
        assert llm.engine.scheduler.kv.prefix_stats.hits > hits_before


def test_prefix_hit_after_the_first_request_finished(llm: LLM, alone) -> None:
    """The shared prefix's blocks, cached by an earlier request, serve a later one."""
    reset_scheduler(llm)
    llm.generate([PROMPTS[5]], GREEDY, use_tqdm=False)
    hits_before = llm.engine.scheduler.kv.prefix_stats.hits
    (out,) = llm.generate([PROMPTS[6]], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.kv.prefix_stats.hits - hits_before == 16  # 4 full blocks
    assert out.outputs[0].token_ids == alone[6]
