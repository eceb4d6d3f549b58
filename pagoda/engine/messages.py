"""The wire between the API server and the engine process: msgspec Structs, one batch per step.

A message to the engine is one type byte followed by the msgpack payload:

    ADD       EngineRequest
    ABORT     list[str]  (request ids)
    SHUTDOWN  nothing

(any other byte is a bug: the engine fails with an error). Back from the engine comes
one EngineMessage at a time, a union tagged by its first element.
"""

from __future__ import annotations

import enum

import msgspec

from pagoda.core.request import FinishReason
from pagoda.sampling_params import SamplingParams


class RequestType(bytes, enum.Enum):
    ADD = b"\x00"
    ABORT = b"\x01"
    SHUTDOWN = b"\x02"


class EngineRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    parent_id: str | None = None


# (token id, logprob, rank) for one candidate at one position.
WireLogprob = tuple[int, float, int]


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    new_logprobs: list[list[WireLogprob]] | None = None  # one list per new token
    prompt_logprobs: list[list[WireLogprob]] | None = None
    num_cached_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to first scheduling, on the first token
    num_preemptions: int = 0  # times the request was preempted, on its finished output
    error: str | None = None  # on a request that failed alone (a grammar that did not compile)


class SpecDecodeStats(msgspec.Struct, array_like=True):
    """Speculative decoding's running totals (vLLM's spec_decode counters)."""

    num_drafts: int = 0  # verification steps of requests that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = []  # accepted drafts at each draft position


class SchedulerStats(msgspec.Struct, array_like=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0  # cumulative, in tokens
    num_preemptions: int = 0  # cumulative
    step_num_tokens: int = 0  # tokens computed in the last step
    step_num_seqs: int = 0  # requests in the last step's batch
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding only


class EngineOutputs(msgspec.Struct, array_like=True, omit_defaults=True, tag="outputs"):
    outputs: list[EngineOutput]
    timestamp: float = 0.0
    stats: SchedulerStats | None = None
    engine_error: str | None = None  # set once, when the engine dies of an exception


class EngineReady(msgspec.Struct, array_like=True, tag="ready"):
    """Sent once by the engine process when the model is loaded."""

    max_model_len: int
    num_blocks: int
    block_size: int
    dtype: str
    vocab_size: int


# What the engine process sends back: EngineReady once (or EngineOutputs with engine_error
# if loading failed), then EngineOutputs every step. The tag, not trial, says which.
EngineMessage = EngineReady | EngineOutputs

encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(EngineRequest)
abort_decoder = msgspec.msgpack.Decoder(list[str])
message_decoder = msgspec.msgpack.Decoder(EngineMessage)
