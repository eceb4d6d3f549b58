"""ReplicaEngineClient: the EngineClient contract over a Ray Serve deployment of engines.

    ingress (build_app's routes)                     EngineReplica (one engine each)
    generate() -> generate_final (non-streamed) ==> generate_final(ReplicaRequest)
               or generate (streamed) =========> generate(ReplicaRequest)
                  request router picks the replica   InProcessEngineClient.generate()
    RequestOutputs <======================== ServedBy(replica), then RequestOutputs

The HTTP layer cannot tell it from an AsyncEngineClient: a replica whose engine died ends its
requests with EngineDeadError (a 500 for that request alone; Ray replaces the replica), and
the ingress is healthy (errored False, /health 200) while some replica's engine is alive.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError, RayError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.engine.protocol import (
    EngineClient,
    EngineDeadError,
    EngineShuttingDown,
    PromptType,
    RequestAborted,
    ServingConfig,
    StatLogger,
)
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.tokenizer import Tokenizer

REPLICA_HEADER = "X-Pagoda-Replica"
RETRY_INTERVAL_S = 0.25


@dataclass
class ReplicaRequest:
    """One generate() call as it travels to a replica."""

    request_id: str
    prompt_token_ids: list[int]
    text: str | None
    sampling_params: SamplingParams

    @property
    def prompt(self) -> str:
        """The token ids as characters: what the prefix-affinity router matches on.

        PrefixAffinityRouter (like Ray's) reads a `prompt` attribute and matches character
        prefixes; one character per token makes its match the engine's own prefix-cache
        match (by tokens), for chat and completion prompts alike.
        """
        return "".join(map(chr, self.prompt_token_ids))


class ReplicaRefused(EngineDeadError):
    """A replica whose engine is dead refused a request before starting it: the request
    never ran, so another replica may take it."""


@dataclass(frozen=True)
class ServedBy:
    """The first item of a replica's stream: which replica took the request."""

    replica: str


# The replicas that served the request being answered (a list per HTTP request, filled by
# generate(), read by ServedByMiddleware when the response starts).
_served_by: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "pagoda_served_by", default=None
)


class ReplicaEngineClient(EngineClient):
    """An EngineClient whose engines are the replicas behind a DeploymentHandle."""

    def __init__(
        self,
        handle: Any,
        tokenizer: Tokenizer,
        config: ServingConfig,
        retry_timeout: float = 30.0,
        health: Callable[[], bool] = lambda: True,
    ) -> None:
        """health: whether some replica's engine is alive (the replicas' latest reports)."""
        # One handle per method, made once: each attribute access on a handle makes a new one.
        self.generate_stream = handle.options(method_name="generate", stream=True)
        self.generate_final = handle.options(method_name="generate_final")
        self.retry_timeout = retry_timeout
        self.health = health
        self.tokenizer = tokenizer
        self._config = config
        self._accepting = True
        # request id -> its DeploymentResponse or DeploymentResponseGenerator
        self._calls: dict[str, Any] = {}
        self.stat_loggers: list[StatLogger] = []

    @property
    def config(self) -> ServingConfig:
        return self._config

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if not self._accepting:
            raise EngineShuttingDown("the server is shutting down")
        text, token_ids = self._split_prompt(prompt)
        request = ReplicaRequest(request_id, token_ids, text, sampling_params)
        if sampling_params.output_kind == RequestOutputKind.FINAL_ONLY:
            yield await self._final(request)
            return
        stream = await self._start(request)
        self._calls[request_id] = stream
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                yield output
        except (EngineDeadError, EngineShuttingDown, RequestAborted, ValueError):
            raise  # the replica's own error (Ray's wrapper is an instance of it too)
        except RayError as e:
            # The replica's actor died mid-request: for this request the engine is gone.
            raise EngineDeadError(f"the replica serving the request failed: {e}") from e
        finally:
            self._calls.pop(request_id, None)
            if not finished:
                stream.cancel()  # the replica's generator is cancelled: its engine aborts

    async def _final(self, request: ReplicaRequest) -> RequestOutput:
        """The one output of a non-streamed request, from one unary call to a replica.

        A replica that refused it (its engine dead, or draining) is retried until
        retry_timeout, by which time Ray has routed around it. An engine that died while
        running it is not: the request may be what killed it.
        """
        deadline = time.monotonic() + self.retry_timeout
        while True:
            response = self.generate_final.remote(request)
            self._calls[request.request_id] = response
            try:
                served_by, output = await response
            except (ReplicaRefused, EngineShuttingDown, RayActorError) as e:
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"no replica took the request: {e}") from e
                await asyncio.sleep(RETRY_INTERVAL_S)
                continue
            except (EngineDeadError, RequestAborted, ValueError):
                raise  # the replica's own error (Ray's wrapper is an instance of it too)
            except RayError as e:
                raise EngineDeadError(f"the replica serving the request failed: {e}") from e
            except asyncio.CancelledError:
                response.cancel()  # the client went away: the replica's engine aborts
                raise
            finally:
                self._calls.pop(request.request_id, None)
            self._record(served_by)
            return output

    async def _start(self, request: ReplicaRequest) -> Any:
        """The stream of a replica that took the request (its ServedBy read).

        A replica whose engine is dead refuses a request before starting it, and Ray may
        route there until the replica's next health check: such a refusal is retried (the
        request never ran) until retry_timeout, by which time Ray has routed around it.
        """
        deadline = time.monotonic() + self.retry_timeout
        while True:
            stream = self.generate_stream.remote(request)
            try:
                first = await stream.__anext__()
            except (ReplicaRefused, EngineShuttingDown, RayActorError) as e:
                stream.cancel()
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"no replica took the request: {e}") from e
                await asyncio.sleep(RETRY_INTERVAL_S)
                continue
            self._record(first)
            return stream

    @staticmethod
    def _record(served_by: ServedBy) -> None:
        assert isinstance(served_by, ServedBy), "a replica answers with ServedBy first"
        replicas = _served_by.get()
        if replicas is not None:
            replicas.append(served_by.replica)

    async def abort(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()

    @property
    def is_running(self) -> bool:
        return self._accepting

    @property
    def errored(self) -> bool:
        """When no replica's engine is alive. One dead replica is not: Ray replaces it, and
        the others serve meanwhile."""
        return not self.health()

    @property
    def dead_error(self) -> BaseException:
        return EngineDeadError("no replica has a live engine")

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error

    def shutdown(self, timeout: float = 0.0) -> None:
        """Takes no new requests and waits up to timeout seconds for those in flight (as
        AsyncEngineClient.shutdown does); the replicas stop as Ray Serve stops them."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._calls and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        self._accepting = False

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Kept, never told: each replica's engine feeds its own metrics."""
        self.stat_loggers.append(stat_logger)

    def _split_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return None, list(prompt)


class ServedByMiddleware:
    """Adds X-Pagoda-Replica (the replica that generated the answer) to responses whose
    generation ended before they started: every non-streamed one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replicas: list[str] = []
        token = _served_by.set(replicas)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start" and replicas:
                MutableHeaders(scope=message)[REPLICA_HEADER] = ",".join(dict.fromkeys(replicas))
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _served_by.reset(token)
