"""EngineClient: everything the HTTP layer may ask of an engine, and the errors it may meet."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from pagoda.config import StructuredOutputsConfig
from pagoda.engine.messages import EngineOutputs, EngineRequest
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer import Tokenizer


class EngineDeadError(RuntimeError):
    """The engine process died or raised; no request can be served any more."""


class EngineShuttingDown(RuntimeError):
    """The engine is draining for shutdown and takes no new requests."""


class RequestAborted(RuntimeError):
    """The request was aborted (by abort(), or by a shutdown that ran out of time)."""


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list[int]
    prompt: str  # the text the ids came from, when there is one


PromptType = str | list[int] | TokensPrompt


@dataclass(frozen=True)
class ServingConfig:
    """What the HTTP layer needs to know about the engine behind it."""

    model_path: str
    served_model_names: tuple[str, ...]
    max_model_len: int
    vocab_size: int
    dtype: str
    num_gpu_blocks: int  # blocks in the KV cache
    block_size: int  # tokens per block
    enable_prefix_caching: bool
    cache_dtype: str = "auto"  # --kv-cache-dtype as given
    speculative: bool = False  # --speculative-config given: its metrics are exported
    # The defaults a request's constraint takes where it says nothing (JSON layout).
    structured: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)


class StatLogger(Protocol):
    """Told of every request, abort and engine step (the metrics endpoint is one)."""

    def request_added(self, request: EngineRequest) -> None: ...
    def request_aborted(self, engine_ids: list[str]) -> None: ...
    def step(self, step: EngineOutputs, outputs: list[RequestOutput]) -> None: ...


class EngineClient(abc.ABC):
    tokenizer: Tokenizer

    @property
    @abc.abstractmethod
    def config(self) -> ServingConfig: ...

    @abc.abstractmethod
    def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields outputs until the request finishes; leaving the iterator aborts it."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @property
    @abc.abstractmethod
    def errored(self) -> bool: ...

    @property
    @abc.abstractmethod
    def dead_error(self) -> BaseException: ...

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raises EngineDeadError when the engine is dead."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 0.0) -> None:
        """Drains for up to timeout seconds, aborts the rest, stops the engine. Blocking."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stops the engine at once, without draining (a second SIGINT/SIGTERM)."""

    @abc.abstractmethod
    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Tells stat_logger of every request added or aborted and of every engine step."""
