from __future__ import annotations

from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.core.batch import RunnerOutput, SchedulerOutput
from pagoda.core.request import Request
from pagoda.core.scheduler import Scheduler
from pagoda.sampling_params import SamplingParams


def make_request(request_id: str, num_tokens: int, max_tokens: int = 8, start: int = 0) -> Request:
    """A request whose prompt is the token ids start, start + 1, ..."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return Request(request_id, list(range(start, start + num_tokens)), params, eos_token_ids=(2,))


def make_scheduler(
    num_blocks: int = 32,
    block_size: int = 4,
    budget: int = 64,
    max_num_seqs: int = 16,
    caching: bool = True,
    max_model_len: int | None = None,
    speculative: SpeculativeConfig | None = None,
) -> Scheduler:
    """max_model_len defaults to what the blocks hold, as the engine's startup check ensures."""
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
        CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        num_blocks,
        max_model_len=max_model_len or num_blocks * block_size,
        speculative=speculative,
    )


def fake_run(out: SchedulerOutput, token: int = 7) -> RunnerOutput:
    """What a runner would return: one token for each request whose prompt is complete
    (and one for each of its drafts)."""
    ro = RunnerOutput()
    for s in out.scheduled:
        if s.samples:
            ro.sampled[s.request.request_id] = [token] * (1 + len(s.draft_token_ids))
    return ro


def step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update_from_output(out, fake_run(out, token))
    scheduler.kv.check_invariants()
    return out
