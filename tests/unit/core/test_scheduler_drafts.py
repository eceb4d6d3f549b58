"""The scheduler with draft tokens: budgeting, verification, slots given back, no cached drafts."""

from __future__ import annotations

from helpers import make_scheduler

from pagoda.config import SpeculativeConfig
from pagoda.core.batch import RunnerOutput, SchedulerOutput
from pagoda.core.block_pool import hash_block_tokens
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler
from pagoda.sampling_params import SamplingParams

# A prompt that repeats itself: after "1 2 3" the lookup drafts "4 5 6 7 ...".
LOOP = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]


def spec_scheduler(k: int = 4, **kwargs) -> Scheduler:
    config = {"num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
    for key in (
        "prompt_lookup_min",
        "disable_by_batch_size",
        "min_acceptance_rate",
        "min_draft_tokens",
    ):
        if key in kwargs:
            config[key] = kwargs.pop(key)
    return make_scheduler(speculative=SpeculativeConfig(**config), **kwargs)


def request(
    request_id: str, prompt: list[int], max_tokens: int = 20, eos: tuple[int, ...] = (99,)
) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return Request(request_id, prompt, params, eos_token_ids=eos)


def run(out: SchedulerOutput, model: dict[str, list[int]]) -> RunnerOutput:
    """A runner whose model continues each request with the tokens in `model` (by its
    output position): row j samples what the model says after the request's tokens and
    its first j drafts, when those drafts agree with the model; junk (0) after a miss."""
    ro = RunnerOutput()
    for s in out.scheduled:
        r = s.request
        num_own = s.num_new_tokens - len(s.draft_token_ids)
        if r.num_computed_tokens + num_own < r.num_tokens:
            continue
        truth = model[r.request_id]
        n = r.num_output_tokens
        tokens = []
        for j in range(len(s.draft_token_ids) + 1):
            agrees = s.draft_token_ids[:j] == truth[n : n + j]
            tokens.append(truth[n + j] if agrees else 0)
        ro.sampled[r.request_id] = tokens
    return ro


def step(s: Scheduler, model: dict[str, list[int]]) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, run(out, model))
    s.kv.check_invariants()
    check_cache_holds_no_drafts(s)
    return out


def check_cache_holds_no_drafts(s: Scheduler) -> None:
    """Every cached block is found by the hash of the tokens it holds for its request."""
    bs = s.kv.block_size
    for request_id, blocks in s.kv.req_blocks.items():
        r = s.requests[request_id]
        parent = None
        for i, block in enumerate(blocks):
            if (i + 1) * bs > r.num_tokens:
                assert block.block_hash is None, f"block {i} of {request_id} cached past its tokens"
                continue
            parent = hash_block_tokens(parent, r.all_token_ids[i * bs : (i + 1) * bs])
            assert block.block_hash in (None, parent)


def test_drafts_are_scheduled_after_the_last_token_and_accepted_as_the_model_agrees() -> None:
    s = spec_scheduler(k=4, block_size=4)
    s.add_request(request("a", LOOP + [1, 2, 3]))
    # The model copies the prompt's loop, then leaves it at its 7th output token.
    model = {"a": [4, 5, 6, 7, 8, 9, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63]}
    out = step(s, model)  # the prompt, with drafts already: 4 5 6 7
    assert out.scheduled[0].draft_token_ids == [4, 5, 6, 7]
    assert out.scheduled[0].num_new_tokens == 16 + 4
    a = s.requests["a"]
    # All four drafts agree; the model's fifth token follows them.
    assert a.output_token_ids == [4, 5, 6, 7, 8]
    assert a.num_computed_tokens == 16 + 4  # the drafts' K/V is the sequence's now
    out = step(s, model)
    assert out.scheduled[0].draft_token_ids == [9, 10, 11, 12]
    assert out.scheduled[0].num_new_tokens == 1 + 4
    # 9 agrees, 10 does not: 50 replaces it; 11 and 12 are dropped and their slots given back.
    assert a.output_token_ids == [4, 5, 6, 7, 8, 9, 50]
    assert a.num_computed_tokens == a.num_tokens - 1
    assert len(s.kv.req_blocks["a"]) == -(-a.num_tokens // 4)
    stats = s.stats().spec_decode
    assert stats is not None
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 8, 5)
    assert stats.num_accepted_tokens_per_pos == [2, 1, 1, 1]
    while s.has_work:
        step(s, model)
    assert a.output_token_ids == model["a"] and a.status == RequestStatus.FINISHED_LENGTH
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks


def test_rejected_drafts_never_enter_the_prefix_cache() -> None:
    s = spec_scheduler(k=4, block_size=4)
    s.add_request(request("a", [7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=12))
    # Drafts "1 2 3 4" fill the block of positions 12..15; the model rejects them all.
    model = {"a": [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]}
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids == [1, 2, 3, 4]
    s.update_from_output(out, run(out, model))
    s.kv.check_invariants()
    check_cache_holds_no_drafts(s)
    a = s.requests["a"]
    assert a.output_token_ids == [30] and len(s.kv.req_blocks["a"]) == 4
    cached_before = set(s.kv.pool.cached)
    assert len(cached_before) == 3  # the prompt's three full blocks, not the drafts'
    # A request whose prompt is the rejected drafts' sequence meets no cached fourth block.
    s.add_request(request("b", [7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 0]))
    hits, num_hit = s.kv.get_computed_blocks(s.requests["b"])
    assert num_hit == 12
    while s.has_work:
        step(s, {**model, "b": [0] * 20})


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there() -> None:
    s = spec_scheduler(k=4, block_size=4)
    s.add_request(request("a", [1, 2, 3, 4, 99, 6, 7, 1, 2, 3], eos=(99,)))
    out = step(s, {"a": [4, 99, 6, 7, 8]})
    assert out.scheduled[0].draft_token_ids == [4, 99, 6, 7]
    a = out.scheduled[0].request
    assert a.output_token_ids == [4, 99] and a.status == RequestStatus.FINISHED_STOPPED
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks


def test_drafts_stay_within_max_tokens_the_context_and_the_budget() -> None:
    s = spec_scheduler(k=4, block_size=4, budget=64)
    s.add_request(request("a", LOOP + [1, 2, 3], max_tokens=3))
    out = step(s, {"a": [4, 5, 6]})
    assert out.scheduled[0].draft_token_ids == [4, 5]  # room for 2 drafts and 1 token
    assert out.scheduled[0].request.output_token_ids == [4, 5, 6]
    assert out.scheduled[0].request.status == RequestStatus.FINISHED_LENGTH

    s = spec_scheduler(k=4, block_size=4, num_blocks=8, max_model_len=19)
    s.add_request(request("b", LOOP + [1, 2, 3]))
    out = step(s, {"b": [4, 5, 6, 7]})
    assert out.scheduled[0].draft_token_ids == [4, 5]  # 16 + 2 + 1 = the context's 19
    assert out.scheduled[0].request.status == RequestStatus.FINISHED_LENGTH

    s = spec_scheduler(k=4, block_size=4, budget=18)
    s.add_request(request("c", LOOP + [1, 2, 3]))
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids == [4, 5]  # the budget's last 2 tokens


def test_a_prompt_that_does_not_fit_the_step_has_no_drafts() -> None:
    s = spec_scheduler(k=4, block_size=4, budget=10)
    s.add_request(request("a", LOOP + [1, 2, 3]))
    out = step(s, {"a": list(range(40, 60))})
    assert out.scheduled[0].num_new_tokens == 10 and not out.scheduled[0].draft_token_ids
    out = step(s, {"a": list(range(40, 60))})
    assert out.scheduled[0].draft_token_ids == [4, 5, 6, 7]  # the rest fits, with 4 drafts


def test_drafts_give_way_to_room_in_the_cache() -> None:
    s = spec_scheduler(k=8, block_size=4, num_blocks=8, caching=False)
    model = {"b": list(range(200, 220)), "a": list(range(300, 320))}
    s.add_request(request("b", list(range(100, 115))))
    step(s, model)  # b holds 4 blocks: 15 prompt tokens and 1 output
    # a's prompt takes the other 4 blocks; its drafts would need more: it runs without.
    s.add_request(request("a", LOOP + [1, 2, 3]))
    out = step(s, model)
    assert [(x.request.request_id, x.draft_token_ids) for x in out.scheduled] == [
        ("b", []),
        ("a", []),
    ]
    assert not out.preempted_ids and s.kv.pool.num_free_blocks == 0


def test_no_drafts_in_a_step_with_disable_by_batch_size_requests() -> None:
    s = spec_scheduler(k=4, block_size=4, disable_by_batch_size=2)
    s.add_request(request("a", LOOP + [1, 2, 3]))
    s.add_request(request("b", LOOP + [1, 2, 3]))
    out = s.schedule()
    assert all(not x.draft_token_ids for x in out.scheduled)
    s.update_from_output(out, run(out, {"a": list(range(4, 30)), "b": [0]}))
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids  # alone again: drafts


def test_a_request_whose_drafts_keep_failing_stops_drafting() -> None:
    s = spec_scheduler(
        k=4, block_size=4, prompt_lookup_min=1, min_acceptance_rate=0.2, min_draft_tokens=32
    )
    # Every other token is 1, and what follows a 1 is new each time: every draft is rejected.
    s.add_request(request("a", [1, 2, 3] * 4, max_tokens=200))
    model = {"a": [t for i in range(100) for t in (40 + i, 1)]}
    drafted = []
    for _ in range(40):
        out = step(s, model)
        drafted.append(bool(out.scheduled[0].draft_token_ids))
    a = s.requests["a"]
    assert a.num_draft_tokens >= 32 and a.num_accepted_tokens < 0.2 * a.num_draft_tokens
    assert not any(drafted[-5:])


def test_by_default_a_request_stops_drafting_after_16_failing_draft_tokens() -> None:
    s = make_scheduler(speculative=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1))
    s.add_request(request("a", [1, 2, 3] * 4, max_tokens=200))
    model = {"a": [t for i in range(100) for t in (40 + i, 1)]}  # every draft rejected
    drafted = [bool(step(s, model).scheduled[0].draft_token_ids) for _ in range(40)]
    a = s.requests["a"]
    assert 16 <= a.num_draft_tokens < 16 + 4 and a.num_accepted_tokens == 0
    assert not any(drafted[-20:])
