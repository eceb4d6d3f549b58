"""InProcessEngineClient: the engine core on a thread of this process; no ZMQ, no second process.

    event loop (this process)                     engine thread (same process)
    generate() -> OutputProcessor.add -> SimpleQueue ====> run_busy_loop: EngineCore.step()
    per-request queues <- _on_step <== call_soon_threadsafe <- EngineOutputs (objects, as is)

The same contract and the same request handling as AsyncEngineClient (it is one, with another
transport): requests and outputs cross a thread boundary as Python objects, not as msgpack
frames over ZMQ, and nothing waits on a poll. For a process that something outside watches
and replaces, a Ray Serve replica: `pagoda serve` keeps its engine in a process of its own,
which its launcher watches and can kill. Here an engine that raises ends every request in
flight with EngineDeadError and leaves the client errored; a step that never returns is
caught by the watchdog timeout; the process dying takes the engine with it, and whoever
watches the process (Ray) sees that. The model's ops release the GIL while they compute; the
scheduler's and the output processor's Python code take turns with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import traceback

from pagoda.engine import messages as m
from pagoda.engine.async_client import AsyncEngineClient
from pagoda.engine.core import EngineCore, Message, run_busy_loop
from pagoda.engine.protocol import EngineDeadError

logger = logging.getLogger(__name__)


class InProcessEngineClient(AsyncEngineClient):
    """AsyncEngineClient whose engine core runs on a thread of this process."""

    def _start_engine(self) -> None:
        """The inbox only: the thread starts in ready(), where the event loop is known."""
        self._requests: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def ready(self, timeout: float = 600.0) -> None:
        """Loads the model on the engine thread, then lets it take requests."""
        self._loop = asyncio.get_running_loop()
        loaded: concurrent.futures.Future[m.EngineReady] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(self._loop, loaded), name="pagoda-engine", daemon=True
        )
        self._thread.start()
        try:
            info = await asyncio.wait_for(asyncio.wrap_future(loaded), timeout)
        except TimeoutError:
            raise TimeoutError(f"the engine was not ready within {timeout} s") from None
        except Exception as e:
            raise EngineDeadError(f"the engine failed while loading:\n{e}") from e
        await self._on_ready(info)
        self._watch_task = asyncio.create_task(self._watch(), name="engine-watch")

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        loaded: concurrent.futures.Future[m.EngineReady],
    ) -> None:
        """The engine thread: load, then the busy loop until SHUTDOWN or an exception."""
        try:
            core = EngineCore(self.engine_config)
        except BaseException as e:
            logger.exception("the engine failed while loading")
            loaded.set_exception(e)
            return
        loaded.set_result(core.ready_message())

        def send(step: m.EngineOutputs) -> None:
            loop.call_soon_threadsafe(self._on_step, step)

        try:
            run_busy_loop(core, self._receive, send)
        except Exception:
            logger.exception("engine core failed")
            if not loop.is_closed():
                send(m.EngineOutputs([], engine_error=traceback.format_exc()))

    def _receive(self, timeout: float) -> Message | None:
        try:
            if timeout <= 0:
                return self._requests.get_nowait()
            return self._requests.get(timeout=timeout)
        except queue.Empty:
            return None

    def _exit_reason(self) -> str:
        return "the engine thread ended"

    def _engine_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _send(self, kind: m.RequestType, payload: object) -> bool:
        """Hands a message to the engine thread; False when the thread has ended."""
        if not self._engine_alive():
            return False
        self._requests.put((kind, payload))
        return True

    def kill(self) -> None:
        """A thread cannot be killed: it is told to stop, and ends with the process."""
        self._stopping = True
        self._send(m.RequestType.SHUTDOWN, None)

    def _stop_process(self) -> None:
        self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._send(m.RequestType.SHUTDOWN, None)
            self._thread.join(5)  # at most one step: it returns at its next look at the inbox
        if self._watch_task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._watch_task.cancel)
