"""Request: one sequence inside the engine, described by its token counts."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:  # the API server imports this module, and must not import torch
    from pagoda.structured.matcher import RequestGrammar


class FinishReason(str, enum.Enum):
    """Why a sequence ended, in the OpenAI API's words: from RequestStatus to the wire to HTTP.

    A str, so that it is the plain word in msgpack, JSON and metric labels alike.
    """

    STOP = "stop"  # an EOS or stop token, or a stop string
    LENGTH = "length"  # max_tokens, or the end of the context
    ABORT = "abort"  # aborted by the client or by shutdown

    def __str__(self) -> str:
        return self.value


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """A sequence: prompt tokens, then output tokens, of which num_computed_tokens are cached.

    | prompt .................... | output ...... |
    |<-- num_computed_tokens -->|                 |  <- the scheduler gives the rest
    |<----------------- num_tokens -------------->|
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        parent_id: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        assert sampling_params.max_tokens is not None, "max_tokens is resolved at the edge"
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.parent_id = parent_id  # set for the samples of an n > 1 request
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.added_at = time.monotonic()  # this process's clock, for the queue time
        self.first_scheduled_at: float | None = None
        self.all_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prefix-cache hit when first scheduled
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None
        self.error: str | None = None  # why an aborted request failed, for its client
        self.num_preemptions = 0
        self.num_prompt_logprobs_sent = 0  # a preempted request recomputes, but sends once
        self.block_hashes: list[int] = []  # chain hashes of the full blocks of all_token_ids
        # Seed of the counter-based sampler: fixed per request, so the batch cannot change it.
        self.sampling_seed = 0
        self.grammar: RequestGrammar | None = None  # structured outputs: the allowed tokens
        self.num_draft_tokens = 0  # speculative decoding: draft tokens verified so far
        self.num_accepted_tokens = 0  # of which the model agreed with

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finished status the last token brings, or None while it goes on."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        assert params.max_tokens is not None
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
