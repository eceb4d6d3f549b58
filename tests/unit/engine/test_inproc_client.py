"""The engine core on a thread of this process: the same answers, abort, death and shutdown as
with the engine in its own process, on a tiny random-weight model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pagoda.config import EngineConfig, ModelConfig
from pagoda.engine.core import EngineCore
from pagoda.engine.inproc_client import InProcessEngineClient
from pagoda.engine.llm import LLM
from pagoda.engine.protocol import EngineDeadError, EngineShuttingDown, RequestAborted
from pagoda.sampling_params import RequestOutputKind, SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def run_with_client(path, check, watchdog_timeout: float | None = None) -> None:
    """Runs check(client) on an in-process client, shutting it down whatever happens."""

    async def main() -> None:
        config = EngineConfig(model=ModelConfig(path=path, dtype="float32"))
        client = InProcessEngineClient(config, watchdog_timeout=watchdog_timeout)
        await client.ready()
        try:
            await check(client)
        finally:
            client.shutdown(0)
        assert not client._engine_alive(), "the engine thread outlived shutdown()"

    asyncio.run(main())


async def collect(client: InProcessEngineClient, prompt, params, request_id: str) -> list:
    return [out async for out in client.generate(prompt, params, request_id)]


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pagoda-engine"]


def test_same_greedy_tokens_as_the_offline_engine(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    prompts = [[1, 5, 9, 200, 17], [3, 3, 3], list(range(10, 40))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [
        o.outputs[0].token_ids for o in LLM(str(path), dtype="float32").generate(prompts, params)
    ]

    async def check(client: InProcessEngineClient) -> None:
        # Concurrent requests batch together in the engine thread's steps.
        runs = await asyncio.gather(
            *(collect(client, p, params, f"r{i}") for i, p in enumerate(prompts))
        )
        assert [run[-1].outputs[0].token_ids for run in runs] == expected
        assert all(run[-1].finished for run in runs)

    run_with_client(path, check)


def test_stream_abort_and_drain(tiny_model_dir, monkeypatch) -> None:
    # Steps of 20 ms at least: a long request (its 512-token context) then outlives the
    # waits below, however fast the machine.
    step = EngineCore.step

    def slow_step(self: EngineCore):
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(EngineCore, "step", slow_step)

    async def check(client: InProcessEngineClient) -> None:
        delta = SamplingParams(temperature=0, max_tokens=6, output_kind=RequestOutputKind.DELTA)
        outputs = await collect(client, [1, 2, 3], delta, "a")
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert sum(len(o.outputs[0].token_ids) for o in outputs) == 6

        # Leaving the iterator early aborts the request in the engine.
        stream = client.generate([4, 5, 6], LONG, "b")
        await stream.__anext__()
        await stream.aclose()
        assert not client.processor.has_unfinished()
        deadline = time.monotonic() + 60
        while client.stats.num_running != 0:
            assert time.monotonic() < deadline, "the engine kept running the request"
            await asyncio.sleep(0.02)

        # An explicit abort ends a running generate() with RequestAborted.
        task = asyncio.create_task(collect(client, [7, 8], LONG, "c"))
        await asyncio.sleep(0.3)
        await client.abort("c")
        with pytest.raises(RequestAborted):
            await task

        # shutdown(5): the short request completes, the long one (10 s at least) is aborted,
        # the thread ends.
        short = asyncio.create_task(collect(client, [9], SHORT, "short"))
        long = asyncio.create_task(collect(client, [10], LONG, "long"))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, client.shutdown, 5.0)
        assert (await short)[-1].finished
        with pytest.raises(RequestAborted):
            await long
        assert not client._engine_alive() and not client.errored
        with pytest.raises(EngineShuttingDown):
            await collect(client, [11], SHORT, "late")

    run_with_client(tiny_model_dir("llama"), check)
    assert not engine_threads()


def test_an_engine_that_raises_fails_its_requests(tiny_model_dir, monkeypatch) -> None:
    steps = 0
    step = EngineCore.step

    def failing_step(self: EngineCore):
        nonlocal steps
        steps += 1
        if steps > 5:
            raise RuntimeError("a kernel fell over")
        return step(self)

    monkeypatch.setattr(EngineCore, "step", failing_step)

    async def check(client: InProcessEngineClient) -> None:
        tasks = [asyncio.create_task(collect(client, [i + 1], LONG, str(i))) for i in range(3)]
        for task in tasks:  # a generous deadline: only a request left hanging misses it
            with pytest.raises(EngineDeadError, match="a kernel fell over"):
                await asyncio.wait_for(task, 60)
        assert client.errored and not client.is_running
        with pytest.raises(EngineDeadError):
            await client.check_health()
        with pytest.raises(EngineDeadError):
            await collect(client, [1], SHORT, "after")

    run_with_client(tiny_model_dir("llama"), check)


def test_a_hung_step_is_caught_by_the_watchdog(tiny_model_dir, monkeypatch) -> None:
    release = threading.Event()
    step = EngineCore.step

    def hanging_step(self: EngineCore):
        release.wait(60)
        return step(self)

    monkeypatch.setattr(EngineCore, "step", hanging_step)

    async def check(client: InProcessEngineClient) -> None:
        try:
            with pytest.raises(EngineDeadError, match="hung"):
                await asyncio.wait_for(collect(client, [1, 2], SHORT, "h"), 30)
            assert client.errored
        finally:
            release.set()

    run_with_client(tiny_model_dir("llama"), check, watchdog_timeout=2.0)


def test_a_model_that_fails_to_load_is_reported(tmp_path) -> None:
    broken = tmp_path / "broken"  # a model directory without config.json
    broken.mkdir()

    async def main() -> None:
        config = EngineConfig(model=ModelConfig(path=broken, dtype="float32"))
        client = InProcessEngineClient(config)
        with pytest.raises(EngineDeadError, match="while loading"):
            await client.ready(timeout=60)
        client.shutdown(0)

    asyncio.run(main())
    assert not engine_threads()
