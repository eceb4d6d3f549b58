from __future__ import annotations

import pytest
from helpers import fake_run, make_request, make_scheduler, step

from pagoda.core.request import RequestStatus


def test_budget_is_shared_running_first_then_fcfs() -> None:
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 6, start=100))
    out = step(s)
    # a gets its whole prompt; b gets a 4-token chunk (chunked prefill)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6), ("b", 4)]
    out = step(s)
    # a decodes one token, b finishes its prompt with the last 2
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 2)]
    assert s.requests["a"].num_output_tokens == 2 and s.requests["b"].num_output_tokens == 1


def test_block_ids_are_allocated_per_block() -> None:
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 5))
    s.add_request(make_request("b", 3, start=100))
    out = step(s)
    assert [x.block_ids for x in out.scheduled] == [[0, 1], [2]]
    out = step(s)  # a writes position 5 into block 1; b position 3 into block 2
    assert [x.block_ids for x in out.scheduled] == [[0, 1], [2]]
    out = step(s)  # b's position 4 needs a new block
    assert [x.block_ids for x in out.scheduled] == [[0, 1], [2, 3]]


def test_max_num_seqs_limits_running() -> None:
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(make_request(str(i), 4, start=10 * i))
    out = step(s)
    assert [x.request.request_id for x in out.scheduled] == ["0", "1"]
    assert len(s.waiting) == 1


def test_preemption_frees_the_newest_and_resumes_it() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, caching=False)
    s.add_request(make_request("a", 7, max_tokens=6))
    s.add_request(make_request("b", 7, max_tokens=6, start=50))
    step(s)  # both prefill: 2 blocks each, pool full
    step(s)  # position 7 of each fits in the second block
    out = step(s)  # a needs a third block: b (newest) is preempted
    assert out.preempted_ids == ["b"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]  # nothing lost
    assert s.num_preemptions == 1
    while s.has_work:
        step(s)
    assert s.kv.pool.num_free_blocks == 4


def test_finished_output_carries_the_request_preemptions() -> None:
    s = make_scheduler(num_blocks=4, block_size=4, caching=False)
    s.add_request(make_request("a", 7, max_tokens=6))
    s.add_request(make_request("b", 7, max_tokens=6, start=50))
    finished = {}
    while s.has_work:
        out = s.schedule()
        for eo in s.update_from_output(out, fake_run(out)).outputs:
            assert eo.num_preemptions == 0 or eo.finish_reason is not None
            if eo.finish_reason is not None:
                finished[eo.request_id] = eo.num_preemptions
    assert s.num_preemptions >= 1
    assert finished == {"a": 0, "b": s.num_preemptions}  # only b, the newest, is preempted


def test_prefix_hit_skips_cached_blocks() -> None:
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 10, max_tokens=1))
    step(s)
    assert "a" not in s.requests  # finished after one token; its blocks stay cached
    s.add_request(make_request("b", 11, max_tokens=1))  # same first 10 tokens
    out = step(s)
    (x,) = out.scheduled
    assert x.request.num_cached_tokens == 8  # two full blocks hit
    assert x.num_new_tokens == 3
    assert s.kv.prefix_stats.hits == 8


def test_full_hit_still_computes_one_token() -> None:
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 8, max_tokens=1))
    step(s)
    s.add_request(make_request("b", 8, max_tokens=1))
    out = step(s)
    assert out.scheduled[0].num_new_tokens == 4  # the last block is recomputed to sample


def test_abort_in_every_state_returns_every_block() -> None:
    s = make_scheduler(budget=6, block_size=4)
    s.add_request(make_request("decoding", 3, max_tokens=50))
    s.add_request(make_request("prefilling", 20, max_tokens=50, start=100))
    s.add_request(make_request("waiting", 5, max_tokens=50, start=200))
    step(s)
    step(s)
    assert s.requests["decoding"].num_output_tokens == 2
    assert 0 < s.requests["prefilling"].num_computed_tokens < 20
    assert s.requests["waiting"].status == RequestStatus.WAITING
    for request_id in ("prefilling", "waiting", "decoding"):
        assert s.finish_requests([request_id], RequestStatus.FINISHED_ABORTED) == [request_id]
        s.kv.check_invariants()
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks
    assert not s.has_work


def test_abort_many_at_once_in_any_order_with_repeats() -> None:
    s = make_scheduler(num_blocks=64, budget=8, block_size=4)
    for i in range(6):
        s.add_request(make_request(f"r{i}", 3, max_tokens=50, start=10 * i))
    step(s)  # r0, r1 and the start of r2 run; the others wait
    ids = ["r4", "r0", "missing", "r4", "r1", "r5"]
    assert s.finish_requests(ids, RequestStatus.FINISHED_ABORTED) == ["r4", "r0", "r1", "r5"]
    assert [r.request_id for r in s.running] + [r.request_id for r in s.waiting] == ["r2", "r3"]
    s.kv.check_invariants()
    while s.has_work:
        step(s)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks


def test_the_step_records_where_each_request_starts_and_whether_it_samples() -> None:
    """The runner reads the step as scheduled: a prompt chunk that leaves tokens to
    compute samples nothing; the chunk that ends the prompt samples."""
    s = make_scheduler(budget=6, block_size=4)
    s.add_request(make_request("a", 10))
    chunks = [step(s).scheduled[0] for _ in range(3)]
    assert [(c.num_computed_tokens, c.num_new_tokens, c.samples) for c in chunks] == [
        (0, 6, False),
        (6, 4, True),
        (10, 1, True),
    ]


def test_identical_prompts_in_one_step_share_full_blocks() -> None:
    """Blocks are hashed when scheduled, so a second copy in the same step reuses them:
    each layer writes the step's K/V before any query reads it."""
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 10))
    out = step(s)
    assert [x.num_new_tokens for x in out.scheduled] == [10, 2]
    assert out.scheduled[1].block_ids[:2] == out.scheduled[0].block_ids[:2]
    assert s.kv.pool.blocks[out.scheduled[0].block_ids[0]].ref_cnt == 2


def test_stats_count_the_step() -> None:
    s = make_scheduler(budget=10, block_size=4)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 6, start=100))
    s.add_request(make_request("c", 6, start=200))
    step(s)
    stats = s.stats()
    assert (stats.step_num_seqs, stats.step_num_tokens) == (2, 10)
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    assert stats.prefix_cache_queries == 12 and stats.prefix_cache_hits == 0
    assert 0 < stats.kv_cache_usage < 1


def test_request_alone_is_never_preempted() -> None:
    """A request of the longest context fits the cache alone: it ends at max_model_len
    instead of preempting itself and prefilling again forever."""
    s = make_scheduler(num_blocks=4, block_size=4, budget=8, caching=False)  # 16 tokens
    s.add_request(make_request("a", 10, max_tokens=100))
    for _ in range(50):
        if not s.has_work:
            break
        step(s)
    assert not s.has_work
    assert s.num_preemptions == 0
    assert s.kv.pool.num_free_blocks == 4


def test_preempting_a_request_that_is_alone_is_a_bug() -> None:
    """A context longer than the cache is refused at startup; were it not, the scheduler
    would stop on an assertion instead of re-prefilling forever or spinning idle."""
    with pytest.raises(AssertionError, match="holds"):
        make_scheduler(num_blocks=4, block_size=4, max_model_len=17)
    s = make_scheduler(num_blocks=4, block_size=4, budget=8, caching=False)
    s.max_model_len = 1000  # what the startup check prevents
    s.add_request(make_request("a", 10, max_tokens=100))
    with pytest.raises(AssertionError, match="alone"):
        for _ in range(50):
            step(s)
    s = make_scheduler(num_blocks=4, block_size=4, budget=64, caching=False)
    s.max_model_len = 1000
    s.add_request(make_request("b", 20))  # the prompt alone needs 5 of the 4 blocks
    with pytest.raises(AssertionError, match="alone"):
        step(s)


def test_prompt_longer_than_the_context_is_a_bug() -> None:
    s = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(AssertionError, match="context"):
        s.add_request(make_request("a", 16))


def test_num_cached_tokens_is_none_until_first_scheduled() -> None:
    s = make_scheduler(block_size=4)
    a = make_request("a", 10, max_tokens=1)
    s.add_request(a)
    assert a.num_cached_tokens is None
    step(s)
    assert a.num_cached_tokens == 0
    b = make_request("b", 10, max_tokens=2)
    s.add_request(b)
    out = s.schedule()
    assert b.num_cached_tokens == 8
    (eo,) = s.update_from_output(out, fake_run(out)).outputs
    assert eo.num_cached_tokens == 8


def test_prefix_hits_survive_requests_that_reuse_uncached_blocks() -> None:
    # a's two full blocks are cached; the requests after it are each given the freed
    # partial blocks back first, and never-written blocks before any of a's.
    s = make_scheduler(num_blocks=16, block_size=4)
    s.add_request(make_request("a", 10, max_tokens=1))
    step(s)
    for i in range(4):
        s.add_request(make_request(f"other{i}", 6, max_tokens=1, start=100 + 10 * i))
        while s.requests:
            step(s)
    s.add_request(make_request("b", 11, max_tokens=1))
    (x,) = step(s).scheduled
    assert x.request.num_cached_tokens == 8  # a's two full blocks still hit


def test_uncached_blocks_keep_the_written_part_of_the_pool_small() -> None:
    # Without prefix caching no freed block is worth keeping: one request after another
    # runs in the same few blocks instead of walking through the whole pool.
    s = make_scheduler(num_blocks=32, block_size=4, caching=False)
    used: set[int] = set()
    for i in range(10):
        s.add_request(make_request(f"r{i}", 6, max_tokens=3, start=10 * i))
        while s.requests:
            step(s)
            used.update(b for r in s.requests for b in s.kv.block_ids(r))
    assert used == {0, 1}
