"""AsyncEngineClient: the engine core in its own process, reached over ZMQ.

    API server process                        engine process
    generate() -> OutputProcessor.add -> PUSH ====> PULL -> EngineCore.step()
    per-request queues <- output loop <- PULL <==== PUSH <- EngineOutputs

Outputs are read by a reader callback of the event loop on the PULL socket's file
descriptor, a plain ZMQ socket drained without blocking (90 us a message through
zmq.asyncio's poll and receive futures, 20-30 us so). A watch task checks the engine:
when it exits, reports an error or goes silent past the watchdog timeout, every waiting
generate() raises EngineDeadError within a fraction of a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable

import zmq

from pagoda.config import EngineConfig
from pagoda.engine import messages as m
from pagoda.engine.core import run_engine_core
from pagoda.engine.output import OutputProcessor
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
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_WATCH_S = 0.2  # how often the engine is checked for having exited or hung


class AsyncEngineClient(EngineClient):
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer | None = None,
        served_model_names: tuple[str, ...] = (),
        watchdog_timeout: float | None = None,
    ) -> None:
        """Starts the engine process; call `await ready()` before generating.

        Without a tokenizer, one is loaded from the model while the engine loads its weights.
        An engine that sends nothing (no step's outputs, no idle heartbeat) for
        watchdog_timeout seconds is taken as hung, and then as dead; None: never.
        """
        self.watchdog_timeout = watchdog_timeout
        self._last_heard = time.monotonic()
        self.engine_config = config
        self.served_model_names = served_model_names or (config.model.path.name,)
        self._tokenizer: Tokenizer | concurrent.futures.Future[Tokenizer] = (
            tokenizer
            if tokenizer is not None
            else concurrent.futures.ThreadPoolExecutor(1).submit(
                Tokenizer.from_path, config.model.path
            )
        )
        self.queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self.stats = m.SchedulerStats()
        self.stat_loggers: list[StatLogger] = []
        self._dead: EngineDeadError | None = None
        self._accepting = True
        self._stopping = False  # the client is stopping the engine: its end is not a death
        self._serving_config: ServingConfig | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.processor: OutputProcessor | None = None  # from ready(), once the tokenizer is in
        self._start_engine()

    def _start_engine(self) -> None:
        """Starts the engine process, and binds the sockets to and from it."""
        base = os.path.join(tempfile.gettempdir(), f"pagoda-{uuid.uuid4().hex[:12]}")
        input_addr, output_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._ipc_paths = [f"{base}-in", f"{base}-out"]
        # The process-wide contexts: a client dropped without shutdown() then leaves two
        # closed-on-exit sockets behind, instead of a context whose finaliser blocks forever.
        # LINGER 0: messages to an engine that is gone must not keep the process alive.
        self._inbox: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PULL)  # its outputs
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(output_addr)
        self._outbox: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)  # to the engine
        self._outbox.setsockopt(zmq.LINGER, 0)
        # No queue limit: a send then fails (see _send) only when no engine is connected.
        self._outbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.bind(input_addr)
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(self.engine_config, input_addr, output_addr),
            name="pagoda-engine",
            daemon=True,
        )
        self.process.start()

    async def ready(self, timeout: float = 600.0) -> None:
        """Waits for the engine to load its model, then starts reading its outputs."""
        deadline = time.monotonic() + timeout
        while not self._inbox.poll(0):
            if not self.process.is_alive():
                raise EngineDeadError(
                    f"the engine process exited with code {self.process.exitcode} while loading"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine was not ready within {timeout} s")
            await asyncio.sleep(0.05)
        info = m.message_decoder.decode(self._inbox.recv())
        if not isinstance(info, m.EngineReady):
            raise EngineDeadError(f"the engine failed while loading:\n{info.engine_error}")
        await self._on_ready(info)
        assert self._loop is not None
        self._inbox_fd = self._inbox.fileno()
        self._loop.add_reader(self._inbox_fd, self._read_outputs)
        self._read_outputs()  # the descriptor is edge-triggered: take what came before
        self._watch_task = asyncio.create_task(self._watch(), name="engine-watch")

    async def _on_ready(self, info: m.EngineReady) -> None:
        """The engine has loaded: the tokenizer, the output processor and the serving config."""
        if isinstance(self._tokenizer, concurrent.futures.Future):
            self._tokenizer = await asyncio.wrap_future(self._tokenizer)
        self.tokenizer = self._tokenizer
        self.processor = OutputProcessor(self.tokenizer)
        self._serving_config = ServingConfig(
            model_path=str(self.engine_config.model.path),
            served_model_names=self.served_model_names,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            dtype=info.dtype,
            num_gpu_blocks=info.num_blocks,
            block_size=info.block_size,
            enable_prefix_caching=self.engine_config.cache.enable_prefix_caching,
            cache_dtype=self.engine_config.cache.kv_cache_dtype,
            speculative=self.engine_config.speculative is not None,
            structured=self.engine_config.structured,
        )
        self._loop = asyncio.get_running_loop()
        self._last_heard = time.monotonic()

    @property
    def _processor(self) -> OutputProcessor:
        assert self.processor is not None, "await ready() first"
        return self.processor

    @property
    def config(self) -> ServingConfig:
        assert self._serving_config is not None, "await ready() first"
        return self._serving_config

    # ---- the contract -------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._engine_alive()

    @property
    def errored(self) -> bool:
        """The engine died or raised (a process stopped by shutdown() did neither)."""
        return self._dead is not None or (self._accepting and not self._engine_alive())

    @property
    def dead_error(self) -> BaseException:
        return self._dead or EngineDeadError("the engine process is not running")

    async def check_health(self) -> None:
        if self.errored:
            raise self.dead_error

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if not self._accepting:
            raise EngineShuttingDown("the server is shutting down")
        if self.errored:
            raise self.dead_error
        text, token_ids = self._split_prompt(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.config.max_model_len:  # the scheduler asserts it
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; the context holds "
                f"{self.config.max_model_len}"
            )
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        finished = False
        # Whatever fails from here on (a message that cannot be encoded, a dead engine, the
        # caller leaving), the finally forgets the request: state left in the processor
        # would make a later shutdown wait out its whole drain timeout.
        try:
            self.queues[request_id] = queue
            for er in self._processor.add_request(request_id, text, token_ids, sampling_params):
                if not self._send(m.RequestType.ADD, er):
                    raise EngineDeadError("the engine process is not taking requests")
                for stat_logger in self.stat_loggers:
                    stat_logger.request_added(er)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        self.stat_loggers.append(stat_logger)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Stops taking requests, drains for up to timeout seconds, aborts the rest, stops."""
        self._accepting = False
        if self.processor is not None:  # before ready() no request can be in flight
            deadline = time.monotonic() + timeout
            while self.processor.has_unfinished() and not self.errored:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            self._call_in_loop(self._abort_all)
        self._stop_process()

    # ---- internals ----------------------------------------------------------------------

    def _split_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        return None, list(prompt)

    def _engine_alive(self) -> bool:
        return self.process.is_alive()

    def _send(self, kind: m.RequestType, payload: object) -> bool:
        """Queues a message for the engine without blocking; False when no engine is
        connected to take it (it died, or is exiting), where a blocking send would wait
        forever. Aborts and the shutdown request then have nobody to tell."""
        try:
            self._outbox.send_multipart(
                [kind.value, m.encoder.encode(payload)], flags=zmq.NOBLOCK, copy=False
            )
        except zmq.Again:
            return False
        return True

    def _abort_now(self, request_id: str) -> None:
        """Forgets the request here, tells the engine, and ends its generate() cleanly."""
        engine_ids = self._processor.abort_request(request_id)
        if engine_ids and not self.errored:
            self._send(m.RequestType.ABORT, engine_ids)
        for stat_logger in self.stat_loggers:
            stat_logger.request_aborted(engine_ids)
        queue = self.queues.get(request_id)
        if queue is not None:
            queue.put_nowait(RequestAborted(f"request {request_id} was aborted"))

    def _abort_all(self) -> None:
        for request_id in list(self._processor.requests):
            self._abort_now(request_id)

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        """Runs fn on the event loop's thread (ZMQ sockets are not thread-safe) and waits."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            fn()
            return
        try:
            if asyncio.get_running_loop() is loop:
                fn()
                return
        except RuntimeError:
            pass  # no loop in this thread: we are in an executor
        done = asyncio.run_coroutine_threadsafe(_as_coroutine(fn), loop)
        done.result(timeout=5)

    def _read_outputs(self) -> None:
        """The event loop's reader of the inbox: every step's outputs that have arrived."""
        while self._dead is None and self._inbox.poll(0, zmq.POLLIN):
            step = m.message_decoder.decode(self._inbox.recv(zmq.NOBLOCK))
            assert isinstance(step, m.EngineOutputs), "the engine is ready only once"
            self._on_step(step)

    async def _watch(self) -> None:
        """Marks the engine dead when it ended without being asked to, or when it sent
        nothing (no step, no idle heartbeat) for watchdog_timeout seconds."""
        try:
            while self._dead is None:
                await asyncio.sleep(_WATCH_S)
                if self._dead is not None or self._stopping:
                    return
                if not self._engine_alive():
                    self._mark_dead(self._exit_reason())
                    return
                silent = time.monotonic() - self._last_heard
                if self.watchdog_timeout is not None and silent > self.watchdog_timeout:
                    self._mark_dead(
                        f"the engine made no progress for {silent:.0f} s (a step or an idle "
                        f"heartbeat is due within --watchdog-timeout {self.watchdog_timeout:g} "
                        "s): it is hung"
                    )
                    return
        except asyncio.CancelledError:
            pass

    def _exit_reason(self) -> str:
        return f"the engine process exited with code {self.process.exitcode}"

    def _on_step(self, step: m.EngineOutputs) -> None:
        """Hands a step's outputs to their requests' queues; a step that says the engine
        failed marks it dead (every request then ends with EngineDeadError)."""
        self._last_heard = time.monotonic()
        if step.engine_error is not None:
            self._mark_dead(f"the engine failed:\n{step.engine_error}")
            return
        if step.stats is not None:
            self.stats = step.stats
        outputs, to_abort = self._processor.process_outputs(step.outputs)
        if to_abort:  # finished by a stop string
            self._send(m.RequestType.ABORT, to_abort)
            for stat_logger in self.stat_loggers:
                stat_logger.request_aborted(to_abort)
        for output in outputs:
            queue = self.queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
        for stat_logger in self.stat_loggers:
            stat_logger.step(step, outputs)

    def _mark_dead(self, reason: str) -> None:
        logger.error("%s", reason)
        self._dead = EngineDeadError(reason)
        for queue in self.queues.values():
            queue.put_nowait(self._dead)
        self._processor.requests.clear()
        self._processor.engine_ids.clear()

    def _stop_process(self) -> None:
        self._stopping = True
        if self.process.is_alive():
            try:
                self._send(m.RequestType.SHUTDOWN, None)
            except zmq.ZMQError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._call_in_loop(self._stop_reading)
        self._outbox.close()
        for path in self._ipc_paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _stop_reading(self) -> None:
        """Stops the watch and the inbox's reader, and closes the inbox."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inbox_fd)
        self._inbox.close(linger=0)


async def _as_coroutine(fn: Callable[[], None]) -> None:
    fn()
