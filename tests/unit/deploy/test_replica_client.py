"""ReplicaEngineClient over a fake deployment handle: which replica method a request takes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import pytest

from pagoda.deploy.replica_client import (
    ReplicaEngineClient,
    ReplicaRefused,
    ReplicaRequest,
    ServedBy,
)
from pagoda.engine.protocol import EngineDeadError, ServingConfig, TokensPrompt
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

CONFIG = ServingConfig(
    model_path="m",
    served_model_names=("m",),
    max_model_len=64,
    vocab_size=100,
    dtype="float32",
    num_gpu_blocks=8,
    block_size=16,
    enable_prefix_caching=True,
)


def output(request: ReplicaRequest, token: int, finished: bool) -> RequestOutput:
    reason = "length" if finished else None
    completion = CompletionOutput(0, "x", [token], finish_reason=reason)  # type: ignore[arg-type]
    return RequestOutput(request.request_id, None, request.prompt_token_ids, [completion], finished)


class FakeCall:
    """A DeploymentResponse (awaited) or DeploymentResponseGenerator (iterated)."""

    def __init__(self, run: Callable[[], Any]) -> None:
        self.run = run
        self.items: AsyncIterator[Any] | None = None
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self.run().__await__()

    def __aiter__(self) -> FakeCall:
        return self

    async def __anext__(self) -> Any:
        if self.items is None:
            self.items = self.run()
        return await self.items.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplicas:
    """A handle to replicas: `generate_final` answers after `delay` seconds, refusing the
    first `refusals` calls as a replica whose engine died does."""

    def __init__(self, refusals: int = 0, delay: float = 0.0, dies: bool = False) -> None:
        self.refusals = refusals
        self.delay = delay
        self.dies = dies  # the engine dies while running the request
        self.calls: list[tuple[str, FakeCall]] = []

    def options(self, *, method_name: str, stream: bool = False) -> Any:
        replicas = self

        class Method:
            def remote(self, request: ReplicaRequest) -> FakeCall:
                call = FakeCall(lambda: replicas.answer(method_name, request))
                replicas.calls.append((method_name, call))
                return call

        return Method()

    def answer(self, method: str, request: ReplicaRequest) -> Any:
        if method == "generate":
            return self.stream(request)
        return self.final(request)

    async def final(self, request: ReplicaRequest) -> tuple[ServedBy, RequestOutput]:
        await asyncio.sleep(self.delay)
        if self.refusals > 0:
            self.refusals -= 1
            raise ReplicaRefused("replica r0: the engine is dead")
        if self.dies:
            raise EngineDeadError("the engine process exited")
        return ServedBy("r1"), output(request, 7, finished=True)

    async def stream(self, request: ReplicaRequest) -> AsyncIterator[Any]:
        yield ServedBy("r1")
        for i in range(3):
            yield output(request, i, finished=i == 2)


def client_of(replicas: FakeReplicas) -> ReplicaEngineClient:
    return ReplicaEngineClient(replicas, tokenizer=None, config=CONFIG)  # type: ignore[arg-type]


async def collect(client: ReplicaEngineClient, kind: RequestOutputKind) -> list[RequestOutput]:
    params = SamplingParams(max_tokens=3, output_kind=kind)
    prompt = TokensPrompt(prompt_token_ids=[1, 2])
    return [o async for o in client.generate(prompt, params, "req-1")]


def test_a_non_streamed_request_is_one_unary_call() -> None:
    replicas = FakeReplicas()
    outputs = asyncio.run(collect(client_of(replicas), RequestOutputKind.FINAL_ONLY))
    assert [o.outputs[0].token_ids for o in outputs] == [[7]]
    assert [method for method, _ in replicas.calls] == ["generate_final"]


def test_a_streamed_request_is_one_stream() -> None:
    replicas = FakeReplicas()
    outputs = asyncio.run(collect(client_of(replicas), RequestOutputKind.DELTA))
    assert [o.outputs[0].token_ids for o in outputs] == [[0], [1], [2]]
    assert [method for method, _ in replicas.calls] == ["generate"]


def test_a_non_streamed_request_refused_by_a_dead_replica_is_tried_again() -> None:
    replicas = FakeReplicas(refusals=2)
    outputs = asyncio.run(collect(client_of(replicas), RequestOutputKind.FINAL_ONLY))
    assert [o.outputs[0].token_ids for o in outputs] == [[7]]
    assert [method for method, _ in replicas.calls] == ["generate_final"] * 3


def test_a_non_streamed_request_fails_once_no_replica_takes_it() -> None:
    replicas = FakeReplicas(refusals=1000)
    client = ReplicaEngineClient(replicas, None, CONFIG, retry_timeout=0.3)  # type: ignore[arg-type]
    with pytest.raises(EngineDeadError, match="no replica took the request"):
        asyncio.run(collect(client, RequestOutputKind.FINAL_ONLY))


def test_a_non_streamed_request_whose_engine_died_under_it_is_not_tried_again() -> None:
    replicas = FakeReplicas(dies=True)  # the request may be what killed the engine
    with pytest.raises(EngineDeadError, match="exited"):
        asyncio.run(collect(client_of(replicas), RequestOutputKind.FINAL_ONLY))
    assert [method for method, _ in replicas.calls] == ["generate_final"]


def test_abort_cancels_a_non_streamed_call_in_flight() -> None:
    replicas = FakeReplicas(delay=0.2)
    client = client_of(replicas)

    async def run() -> None:
        task = asyncio.create_task(collect(client, RequestOutputKind.FINAL_ONLY))
        while not replicas.calls:
            await asyncio.sleep(0.01)
        await client.abort("req-1")
        await task

    asyncio.run(run())
    ((_, call),) = replicas.calls
    assert call.cancelled


def test_a_cancelled_caller_cancels_its_non_streamed_call() -> None:
    replicas = FakeReplicas(delay=10.0)
    client = client_of(replicas)

    async def run() -> None:
        task = asyncio.create_task(collect(client, RequestOutputKind.FINAL_ONLY))
        while not replicas.calls:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    ((_, call),) = replicas.calls
    assert call.cancelled


def test_errored_only_when_no_replica_has_a_live_engine() -> None:
    alive = [True]
    client = ReplicaEngineClient(FakeReplicas(), None, CONFIG, health=lambda: alive[0])  # type: ignore[arg-type]
    assert not client.errored
    asyncio.run(client.check_health())
    alive[0] = False
    assert client.errored
    with pytest.raises(EngineDeadError, match="no replica has a live engine"):
        asyncio.run(client.check_health())
