"""The engine in its own process: streaming, abort, death and shutdown, on the default model."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from pagoda.config import EngineConfig, ModelConfig
from pagoda.engine.async_client import AsyncEngineClient
from pagoda.engine.protocol import EngineDeadError, EngineShuttingDown, RequestAborted
from pagoda.sampling_params import RequestOutputKind, SamplingParams
from pagoda.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

LONG = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def run_with_client(path, check) -> None:
    """Runs check(client) on a client of the default model, shutting it down whatever happens."""

    async def main() -> None:
        client = AsyncEngineClient(
            EngineConfig(model=ModelConfig(path=path, dtype="float32")), Tokenizer.from_path(path)
        )
        await client.ready()
        try:
            await check(client)
        finally:
            client.shutdown(0)

    asyncio.run(main())


async def collect(client: AsyncEngineClient, prompt: str, params, request_id: str):
    outputs = []
    async for out in client.generate(prompt, params, request_id):
        outputs.append(out)
    return outputs


def test_stream_abort_and_shutdown(default_model_path) -> None:
    async def check(client: AsyncEngineClient) -> None:
        delta = SamplingParams(temperature=0, max_tokens=8, output_kind=RequestOutputKind.DELTA)
        outputs = await collect(client, "The capital of France is", delta, "a")
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
        assert "Paris" in "".join(o.outputs[0].text for o in outputs)

        # Leaving the iterator early aborts the request in the engine.
        stream = client.generate("Hello", LONG, "b")
        await stream.__anext__()
        await stream.aclose()
        assert not client.processor.has_unfinished()
        deadline = time.monotonic() + 60  # generous: 4000 tokens take far longer
        while client.stats.num_running != 0:
            assert time.monotonic() < deadline, "the engine kept running the request"
            await asyncio.sleep(0.02)

        # An explicit abort ends a running generate() with RequestAborted.
        task = asyncio.create_task(collect(client, "Hello", LONG, "c"))
        await asyncio.sleep(0.3)
        await client.abort("c")
        with pytest.raises(RequestAborted):
            await task

        # A prompt that leaves no room in the context is refused here, before the engine.
        with pytest.raises(ValueError, match="context"):
            await collect(client, [100] * client.config.max_model_len, SHORT, "too-long")
        with pytest.raises(ValueError, match="empty"):
            await collect(client, [], SHORT, "empty")
        assert client.is_running and not client.processor.has_unfinished()

        # The KV cache's configuration, as /metrics shows it in vllm:cache_config_info.
        cache = client.engine_config.cache
        assert client.config.num_gpu_blocks > 0 and client.config.block_size == cache.block_size
        assert client.config.enable_prefix_caching == cache.enable_prefix_caching

        # shutdown(10): the short request completes, the long one is aborted, nothing remains
        # (4 tokens take well under 10 s even on a machine slowed several-fold).
        short = asyncio.create_task(collect(client, "One", SHORT, "short"))
        long = asyncio.create_task(collect(client, "Two", LONG, "long"))
        await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, client.shutdown, 10.0)
        assert (await short)[-1].finished
        with pytest.raises(RequestAborted):
            await long
        assert not client.process.is_alive()
        with pytest.raises(EngineShuttingDown):
            await collect(client, "Three", SHORT, "late")

    run_with_client(default_model_path, check)


def test_a_request_that_cannot_be_sent_leaves_nothing_behind(default_model_path) -> None:
    # Seeds past 64 bits cannot be encoded for the engine (the HTTP layer rejects them;
    # here they stand for any failure after the request was registered). A request left
    # in the processor made a later shutdown wait out its whole drain timeout.
    async def check(client: AsyncEngineClient) -> None:
        with pytest.raises(OverflowError):
            await collect(client, "Hi", SamplingParams(seed=2**64, max_tokens=4), "one")
        # n=2: the first sample reaches the engine, the second cannot be encoded.
        two = SamplingParams(n=2, seed=2**64 - 1, max_tokens=4000, ignore_eos=True)
        with pytest.raises(OverflowError):
            await collect(client, "Hi", two, "two")
        assert not client.processor.has_unfinished() and not client.processor.engine_ids
        assert not client.queues
        deadline = time.monotonic() + 60
        while client.stats.num_running or client.stats.num_waiting:
            assert time.monotonic() < deadline, "the sample that was sent kept running"
            await asyncio.sleep(0.05)
        assert (await collect(client, "Hi", SHORT, "after"))[-1].finished

    run_with_client(default_model_path, check)


def test_engine_death_fails_requests(default_model_path) -> None:
    async def check(client: AsyncEngineClient) -> None:
        tasks = [asyncio.create_task(collect(client, f"Story {i}", LONG, str(i))) for i in range(3)]
        await asyncio.sleep(0.5)
        assert client.is_running and not client.errored
        os.kill(client.process.pid, signal.SIGKILL)
        for task in tasks:  # a generous deadline: only a request left hanging misses it
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(task, 60)
        assert client.errored and not client.is_running
        with pytest.raises(EngineDeadError):
            await client.check_health()
        with pytest.raises(EngineDeadError):
            await collect(client, "after", SHORT, "x")

    run_with_client(default_model_path, check)


def test_unknown_request_type_fails_the_engine_cleanly(default_model_path) -> None:
    """A message the engine cannot read is a bug on this side of the wire: the engine logs
    it and reports an error (not a silent exit that looks like a shutdown)."""

    async def check(client: AsyncEngineClient) -> None:
        client._outbox.send_multipart([b"\x7f", b""])
        deadline = time.monotonic() + 10
        while not client.errored:
            assert time.monotonic() < deadline, "the engine ignored the unknown request"
            await asyncio.sleep(0.05)
        assert "unknown request type" in str(client.dead_error)
        client.process.join(10)
        assert client.process.exitcode == 1

    run_with_client(default_model_path, check)


@pytest.mark.timeout(60)
def test_an_engine_that_fails_to_load_is_reported_and_shut_down(
    default_model_path, tmp_path
) -> None:
    """A model the engine cannot load: ready() raises, shutdown() still stops everything."""
    broken = tmp_path / "broken"  # a model directory without config.json
    broken.mkdir()

    async def main() -> None:
        client = AsyncEngineClient(
            EngineConfig(model=ModelConfig(path=broken, dtype="float32")),
            Tokenizer.from_path(default_model_path),
        )
        with pytest.raises(EngineDeadError):
            await client.ready(timeout=60)
        # The race that once hung shutdown(): the engine exits between the liveness check
        # and the shutdown request, which must then not wait for a reader that is gone.
        client.process.join()
        exited = client.process.is_alive
        client.process.is_alive = lambda: True
        stopper = threading.Thread(target=client.shutdown, args=(0,), daemon=True)
        stopper.start()
        stopper.join(60)  # generous: only a shutdown that hangs misses it
        assert not stopper.is_alive(), "shutdown() hung"
        assert not exited()

    asyncio.run(main())
