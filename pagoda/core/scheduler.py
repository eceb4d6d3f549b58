"""Scheduler: every step, which requests run and how many tokens each computes.

There is no prefill or decode mode. Each step fills one token budget: running
requests first (in the order they started), then waiting ones (first come,
first served). A request is given up to num_tokens - num_computed_tokens
tokens, which covers a whole prompt, a chunk of a long prompt (chunked
prefill), the rest of a prompt after a prefix-cache hit, and one decode token.

With speculative decoding, a request whose remaining tokens all fit the step
also carries draft tokens (spec_decode/ngram.py): they are computed after its
own, the model's choice after each of them is sampled, and update_from_output
keeps the drafts the model agrees with plus its own next token:

    | computed ........ | new | d0 d1 d2 |     scheduled: 1 + 3 tokens
    sampled:                  t0 t1 t2 t3      t0 == d0, t1 == d1, t2 != d2
    appended:                 t0 t1 t2         d2's slot is given back
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

import msgspec

from pagoda.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagoda.core.batch import RunnerOutput, ScheduledRequest, SchedulerOutput
from pagoda.core.kv_cache import KVCacheManager
from pagoda.core.request import Request, RequestStatus
from pagoda.engine.messages import EngineOutput, EngineOutputs, SchedulerStats, SpecDecodeStats
from pagoda.spec_decode.ngram import propose_ngram


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        forced_tokens: bool = True,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        # Any request fits the cache alone: one of max_model_len tokens needs
        # max_model_len - 1 slots (its last token is sampled, never computed). So a
        # request alone is never preempted and every step with work schedules some.
        assert max_model_len <= num_blocks * cache_config.block_size, (
            f"a context of {max_model_len} tokens is longer than the cache holds "
            f"({num_blocks} blocks of {cache_config.block_size}); the engine checks this"
        )
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.forced_tokens = forced_tokens  # append the tokens a grammar forces (structured)
        self.speculative = speculative
        k = speculative.num_speculative_tokens if speculative else 0
        self.spec_stats = SpecDecodeStats(num_accepted_tokens_per_pos=[0] * k)
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_steps = 0  # steps scheduled so far
        self.last_step_tokens = 0
        self.last_step_seqs = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        assert request.num_prompt_tokens < self.max_model_len, (
            f"a prompt of {request.num_prompt_tokens} tokens leaves no room in a context of "
            f"{self.max_model_len}; the caller checks this"
        )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Chooses this step's requests and token counts, allocating their KV slots."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        spec = self.speculative
        drafting = spec is not None and (
            spec.disable_by_batch_size is None
            or len(self.running) + len(self.waiting) < spec.disable_by_batch_size
        )

        # Running requests first. When one cannot get blocks, the most recently
        # started request is preempted (possibly itself) until it can.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = (
                self._drafts(request, request.num_computed_tokens, num_new, budget)
                if drafting
                else []
            )
            while (new_ids := self.kv.allocate_slots(request, num_new + len(drafts))) is None:
                if drafts:
                    drafts = []  # drafts never preempt anyone
                    continue
                assert i > 0 or len(self.running) > 1, (
                    f"request {request.request_id} does not fit the cache alone "
                    f"({request.num_computed_tokens} + {num_new} tokens)"
                )
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if new_ids is None:
                break
            out.scheduled.append(
                ScheduledRequest.of(
                    request,
                    request.num_computed_tokens,
                    num_new,
                    self.kv.block_ids(request.request_id),
                    drafts,
                )
            )
            budget -= num_new + len(drafts)
            i += 1

        # Then waiting ones, in arrival order, unless this step had to preempt.
        while (
            self.waiting
            and budget > 0
            and not out.preempted_ids
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            drafts = self._drafts(request, num_hit, num_new, budget) if drafting else []
            allocated = self.kv.allocate_slots(request, num_new + len(drafts), hits) is not None
            if not allocated and drafts:
                drafts = []  # drafts never keep a request waiting
                allocated = self.kv.allocate_slots(request, num_new, hits) is not None
            if not allocated:
                assert self.running, (
                    f"request {request.request_id} does not fit the empty cache alone "
                    f"({num_hit} + {num_new} tokens)"
                )
                break  # no room: wait for running requests to finish
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit
                request.first_scheduled_at = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(
                ScheduledRequest.of(
                    request, num_hit, num_new, self.kv.block_ids(request.request_id), drafts
                )
            )
            budget -= num_new + len(drafts)
        # The engine steps while there is work: a step that scheduled nothing would repeat.
        assert out.scheduled or not self.has_work, "a step with work scheduled nothing"
        self.num_steps += 1
        self.last_step_tokens = out.num_tokens
        self.last_step_seqs = len(out.scheduled)
        return out

    def _drafts(self, request: Request, num_computed: int, num_new: int, budget: int) -> list[int]:
        """Draft tokens for a request whose remaining num_new tokens all fit the step.

        As many as the budget leaves room for, and no more than could be kept: a step
        appends at most one token past its accepted drafts, within max_tokens and the
        context. For a request that follows a grammar, cut at the first token the grammar
        refuses (as vLLM does): the sampler then masks each draft position with the state
        the grammar would have there. None for requests whose drafts were accepted too
        rarely, or whose grammar is still being built (the step must not wait for it).
        """
        spec = self.speculative
        assert spec is not None
        grammar = request.grammar
        if num_computed + num_new < request.num_tokens or (
            grammar is not None and not grammar.is_ready
        ):
            return []
        if (
            request.num_draft_tokens >= spec.min_draft_tokens
            and request.num_accepted_tokens < spec.min_acceptance_rate * request.num_draft_tokens
        ):
            return []
        max_tokens = request.sampling_params.max_tokens
        assert max_tokens is not None
        k = min(
            spec.num_speculative_tokens,
            budget - num_new,
            max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        if k <= 0:
            return []
        drafts = propose_ngram(
            request.all_token_ids, k, spec.prompt_lookup_min, spec.prompt_lookup_max
        )
        return grammar.valid_draft(drafts) if grammar is not None and drafts else drafts

    def _preempt(self, request: Request) -> None:
        """Frees the request's blocks; it returns to the front of the queue and recomputes."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        request.num_preemptions += 1

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> EngineOutputs:
        """Advances counts, appends sampled tokens, finishes requests; returns what is new."""
        outputs = []
        finished = False
        for s in scheduler_output.scheduled:
            request, start = s.request, s.num_computed_tokens
            request.num_computed_tokens = start + s.num_new_tokens
            tokens = runner_output.sampled.get(request.request_id)
            prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id)
            if prompt_logprobs is not None:
                prompt_logprobs = prompt_logprobs[
                    max(0, request.num_prompt_logprobs_sent - start) :
                ]
                request.num_prompt_logprobs_sent += len(prompt_logprobs)
                prompt_logprobs = prompt_logprobs or None
            if tokens is None and prompt_logprobs is None:
                continue  # a prompt chunk: nothing to report yet
            new_tokens: list[int] = []
            status = None
            if tokens is not None:
                for token in self._verify(s, tokens):
                    request.append_token(token)
                    new_tokens.append(token)
                    if (status := request.check_stop(self.max_model_len)) is not None:
                        break
                    # A grammar may end on an accepted draft: what was sampled after it
                    # is dropped, as it would never have been sampled without drafts.
                    if request.grammar is not None and (
                        (status := self._follow_grammar(request, token)) is not None
                    ):
                        break
                if status is None and request.grammar is not None:
                    status = self._append_forced_tokens(request, new_tokens)
            if status is not None:
                self._finish(request, status)
                finished = True
            logprobs = runner_output.logprobs.get(request.request_id)
            outputs.append(
                EngineOutput(
                    request_id=request.request_id,
                    new_token_ids=new_tokens,
                    finish_reason=status.finish_reason if status else None,
                    stop_reason=request.stop_reason,
                    new_logprobs=(
                        [_wire_logprobs(lp) for lp in logprobs[: len(new_tokens)]]
                        if logprobs is not None
                        else None
                    ),
                    prompt_logprobs=(
                        [_wire_logprobs(p) for p in prompt_logprobs]
                        if prompt_logprobs is not None
                        else None
                    ),
                    num_cached_tokens=request.num_cached_tokens or 0,  # set: it was scheduled
                    queue_time=(
                        _queue_time(request)
                        if new_tokens and request.num_output_tokens == len(new_tokens)
                        else None
                    ),
                    num_preemptions=request.num_preemptions if status else 0,
                    error=request.error if status else None,
                )
            )
        if finished:
            self._drop_finished()
        return EngineOutputs(outputs=outputs, timestamp=time.time())

    def _verify(self, s: ScheduledRequest, sampled: list[int]) -> list[int]:
        """The tokens to append: the drafts the model sampled too, then its own next one.

        sampled[j] is what the model chose after the request's tokens and drafts[:j]. A
        draft it agrees with is kept and the next one stands; at the first disagreement
        the model's token replaces the draft and the rest are dropped, their slots given
        back. For a sampled (temperature > 0) request this is rejection sampling with the
        draft as a one-hot proposal: the draft d is kept with probability p(d), and after
        a rejection the token comes from p without d, renormalised; together, each token
        comes from the model's own p, drawn with the same random number as without drafts.
        """
        drafts = s.draft_token_ids
        assert len(sampled) == len(drafts) + 1, "one sampled token per draft, and one more"
        num_accepted = 0
        while num_accepted < len(drafts) and sampled[num_accepted] == drafts[num_accepted]:
            num_accepted += 1
        if drafts:
            request = s.request
            request.num_computed_tokens -= len(drafts) - num_accepted  # the rejected ones
            self.kv.free_tail(request, request.num_computed_tokens + 1)
            request.num_draft_tokens += len(drafts)
            request.num_accepted_tokens += num_accepted
            stats = self.spec_stats
            stats.num_drafts += 1
            stats.num_draft_tokens += len(drafts)
            stats.num_accepted_tokens += num_accepted
            for pos in range(num_accepted):
                stats.num_accepted_tokens_per_pos[pos] += 1
        return sampled[: num_accepted + 1]

    def _follow_grammar(self, request: Request, token: int) -> RequestStatus | None:
        """Advances the request's grammar past a token just appended: aborted if the grammar
        refuses it, stopped if it completes the grammar, else None."""
        grammar = request.grammar
        assert grammar is not None
        if not grammar.accept(token):
            request.error = grammar.error
            return RequestStatus.FINISHED_ABORTED
        if grammar.is_terminated:
            return RequestStatus.FINISHED_STOPPED
        return None

    def _append_forced_tokens(
        self, request: Request, new_tokens: list[int]
    ) -> RequestStatus | None:
        """Appends the tokens the grammar forces after the step's last token.

        A forced token is the only one the grammar allows, so sampling would pick it
        whatever the logits; appended now, it is computed with the others in the next
        step's chunk (before that step's drafts) instead of taking a decode step of its
        own. Not for requests that want logprobs, which need each token's distribution.
        """
        grammar = request.grammar
        assert grammar is not None
        if not self.forced_tokens or request.sampling_params.logprobs is not None:
            return None
        while (token := grammar.forced_token()) is not None:
            request.append_token(token)
            new_tokens.append(token)
            if (status := request.check_stop(self.max_model_len)) is not None:
                return status
            if (status := self._follow_grammar(request, token)) is not None:
                return status
        return None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[str]:
        """Finishes (aborts) the named requests wherever they are; returns those that existed."""
        done = [i for i in dict.fromkeys(request_ids) if i in self.requests]
        for request_id in done:
            self._finish(self.requests[request_id], status)
        if done:
            self.waiting = deque(r for r in self.waiting if not r.is_finished)
            self._drop_finished()
        return done

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Frees a finished request; _drop_finished then takes it out of the running list."""
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]

    def _drop_finished(self) -> None:
        # One pass for all of a step's finished requests: removing each from the list
        # would cost the list's length per request.
        self.running = [r for r in self.running if not r.is_finished]

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_stats.queries,
            prefix_cache_hits=self.kv.prefix_stats.hits,
            num_preemptions=self.num_preemptions,
            step_num_tokens=self.last_step_tokens,
            step_num_seqs=self.last_step_seqs,
            spec_decode=(
                msgspec.structs.replace(
                    self.spec_stats,
                    num_accepted_tokens_per_pos=list(self.spec_stats.num_accepted_tokens_per_pos),
                )
                if self.speculative is not None
                else None
            ),
        )


def _queue_time(request: Request) -> float | None:
    if request.first_scheduled_at is None:
        return None
    return request.first_scheduled_at - request.added_at


def _wire_logprobs(logprobs: dict[int, tuple[float, int]] | None) -> list[tuple[int, float, int]]:
    return [(t, lp, rank) for t, (lp, rank) in (logprobs or {}).items()]
