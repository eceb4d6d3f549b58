"""The launcher: runs the app under uvicorn and owns the server's life.

serve_http()
  |- logs the routes; binds nothing (the caller bound the socket before the engine started)
  |- uvicorn on the h11 protocol, with header size and count limits that really hold
  |- watchdog_loop: engine dead -> the server exits (unless PAGODA_KEEP_ALIVE_ON_ENGINE_DEATH)
  |- CertificateWatcher (--enable-ssl-refresh): changed key/cert/CA files -> live SSL context
  '- SIGINT/SIGTERM -> drain: refuse new work, engine.shutdown(timeout) in an executor,
     then stop the server; a second signal exits at once
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import psutil
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Mount
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagoda import envs
from pagoda.engine.protocol import EngineClient
from pagoda.entrypoints.openai.api_server import PagodaApp

logger = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 5.0


# ---- HTTP limits ----------------------------------------------------------------------------


class _LimitedConnection(h11.Connection):
    """h11 bounds the size of a request head; this also bounds how many headers it has and
    refuses a request framed two ways."""

    def __init__(self, max_incomplete_event_size: int, max_header_count: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.max_head_size = max_incomplete_event_size
        self.max_header_count = max_header_count
        self.error_status = 400

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as e:
            self.error_status = e.error_status_hint
            raise
        if isinstance(event, h11.Request):
            # h11 bounds only a head still arriving: one that came whole in a single read
            # (uvicorn reads 64 KiB at a time) passes at any size. Measured again here.
            size = len(event.method) + len(event.target) + 12
            size += sum(len(name) + len(value) + 4 for name, value in event.headers)
            if size > self.max_head_size:
                self.error_status = 431
                raise h11.RemoteProtocolError(f"request head over {self.max_head_size} B", 431)
            if len(event.headers) > self.max_header_count:
                self.error_status = 431
                raise h11.RemoteProtocolError(
                    f"too many headers: {len(event.headers)} > {self.max_header_count}", 431
                )
            names = {name for name, _ in event.headers}
            if b"content-length" in names and b"transfer-encoding" in names:
                # h11 would frame by Transfer-Encoding; a proxy in front may frame by
                # Content-Length, and what one reads as body the other reads as a request.
                self.error_status = 400
                raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", 400)
        return event


_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits that keep clients from holding the server.

    - a request head of bounded size and header count (431), framed one way only (400);
    - a deadline for each request head, from the connection's start or from the end of
      the previous response (408): slow senders of headers cannot hold connections;
    - a cap on open connections: one past it is answered 503 and closed.
    """

    def __init__(
        self,
        *args: Any,
        max_head_size: int,
        max_header_count: int,
        header_read_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.conn: _LimitedConnection = _LimitedConnection(max_head_size, max_header_count)
        self.header_read_timeout = header_read_timeout
        self.max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning("more than %d open connections: refusing one", self.max_connections)
            self._answer_and_close(503)
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        # Between requests uvicorn's keep-alive timeout closes a quiet connection; it stops
        # at the first byte of the next head, and the head's own deadline starts there.
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # a head has begun and is not complete
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_read_timeout, self._head_late)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                self._answer_and_close(408)

    def _answer_and_close(self, status: int) -> None:
        """A whole response written past h11 (whose state may not allow one), then close."""
        reason = _REASONS[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s\n"
            % (status, reason, len(reason) + 1, reason)
        )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._cancel_head_timer()
        status = self.conn.error_status
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        reason = _REASONS.get(status, b"Bad Request")
        for event in (
            h11.Response(status_code=status, headers=headers, reason=reason),
            h11.Data(data=reason + b"\n"),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# ---- the server ---------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: ours must not race them."""

    exit_code = 0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def log_routes(app: FastAPI) -> None:
    for route in app.routes:
        if isinstance(route, APIRoute):
            logger.info(
                "Route: %s, Methods: %s", route.path, ", ".join(sorted(route.methods or ()))
            )
        elif isinstance(route, Mount):
            logger.info("Mount: %s", route.path)


async def serve_http(
    app: PagodaApp,
    sock: socket.socket,
    enable_ssl_refresh: bool = False,
    shutdown_timeout: float = 0.0,
    **uvicorn_kwargs: Any,
) -> int:
    """Serves app on the bound socket until shutdown; returns the process exit status."""
    log_routes(app)
    state = app.server_state
    engine = state.engine
    limits = state.config
    # Given here (as uvicorn options) or not, the limits hold: the server config's otherwise.
    max_size = uvicorn_kwargs.pop("h11_max_incomplete_event_size", None)
    max_head_size: int = max_size or limits.h11_max_incomplete_event_size
    max_count = uvicorn_kwargs.pop("h11_max_header_count", None)
    uvicorn_kwargs.pop("http", None)  # httptools would skip every limit
    # The app strips --root-path itself, from prefixed paths only, as vLLM's does; uvicorn's
    # would prefix every path once more, and then /llm/v1/... no longer matched a route.
    uvicorn_kwargs.pop("root_path", None)
    protocol = functools.partial(
        LimitedH11Protocol,
        max_head_size=max_head_size,
        max_header_count=max_count or limits.h11_max_header_count,
        header_read_timeout=limits.header_read_timeout,
        max_connections=limits.max_connections,
    )
    config = uvicorn.Config(
        app,
        http=protocol,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=max_head_size,
        lifespan="off",
        **uvicorn_kwargs,
    )
    config.load()
    server = _Server(config)
    state.on_engine_dead = functools.partial(terminate_if_errored, server, engine)

    loop = asyncio.get_running_loop()
    server_task = loop.create_task(server.serve(sockets=[sock]))
    watchdog = loop.create_task(watchdog_loop(server, engine))
    watcher = None
    if enable_ssl_refresh and config.ssl is not None:
        watcher = CertificateWatcher(
            config.ssl, config.ssl_keyfile, config.ssl_certfile, config.ssl_ca_certs
        )
        watcher.start()

    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            logger.warning("second %s: exiting now", sig.name)
            engine.kill()
            os._exit(128 + sig.value)
        logger.info("%s received: draining for up to %.0f s", sig.name, shutdown_timeout)
        state.draining = True
        loop.create_task(_drain_then_stop(server, engine, shutdown_timeout))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server_task
    except asyncio.CancelledError:
        port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else None
        holder = find_process_using_port(port) if port is not None else None
        if holder is not None:
            logger.warning(
                "port %d is used by process %s launched with command:\n%s",
                port,
                holder.pid,
                " ".join(holder.cmdline()),
            )
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        watchdog.cancel()
        if watcher is not None:
            watcher.stop()
    # Stopped for a reason other than a signal (the watchdog): the engine still goes down.
    if not state.draining:
        await loop.run_in_executor(None, engine.shutdown, 0.0)
    return server.exit_code


async def _drain_then_stop(server: uvicorn.Server, engine: EngineClient, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, engine.shutdown, timeout)
    finally:
        server.should_exit = True


# ---- the watchdog ---------------------------------------------------------------------------


async def watchdog_loop(server: uvicorn.Server, engine: EngineClient) -> None:
    """Every few seconds, checks that the engine lives."""
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        await terminate_if_errored(server, engine)


async def terminate_if_errored(server: uvicorn.Server | None, engine: EngineClient) -> None:
    """A dead engine stops the server with a failing status, unless told to keep it alive."""
    if server is None or not (engine.errored and not engine.is_running):
        return
    if envs.PAGODA_KEEP_ALIVE_ON_ENGINE_DEATH:
        return  # /health answers 503 meanwhile
    if not server.should_exit:
        logger.error("the engine is dead: stopping the server")
    if isinstance(server, _Server):
        server.exit_code = 1
    server.should_exit = True


# ---- ports ----------------------------------------------------------------------------------


def bind_socket(host: str | None, port: int) -> socket.socket:
    """Binds the listening socket now, so that a taken port fails before the engine starts."""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY)
    # only on connections whose socket says TCP. With it on, a response written in two
    # parts waited for the client's delayed ACK: 40 ms on every reused connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "0.0.0.0", port))
    except OSError as e:
        sock.close()
        holder = find_process_using_port(port)
        who = f" by process {holder.pid} ({' '.join(holder.cmdline())})" if holder else ""
        raise OSError(e.errno, f"port {port} is already in use{who}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def bind_unix_socket(path: str) -> socket.socket:
    """Binds a listening Unix domain socket at path (--uds), replacing a stale socket file."""
    if os.path.exists(path) and Path(path).is_socket():
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def find_process_using_port(port: int) -> psutil.Process | None:
    """The other process listening on port, when it can be told."""
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is not None and conn.pid != os.getpid():
                    return psutil.Process(conn.pid)
    except (psutil.Error, OSError):
        pass
    return None


# ---- TLS certificate refresh ----------------------------------------------------------------


class CertificateWatcher:
    """Reloads key, certificate and CA files into the live SSL context when they change.

    Files are polled by (inode, size, mtime) of the resolved path, which notices an
    edit in place, an atomic rename over the file and a swapped symlink alike.
    New connections get the new certificate; open ones keep theirs.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        keyfile: str | os.PathLike[str] | None,
        certfile: str | os.PathLike[str] | None,
        ca_certs: str | os.PathLike[str] | None,
        interval: float = 1.0,
    ) -> None:
        self.context = context
        self.keyfile, self.certfile, self.ca_certs = keyfile, certfile, ca_certs
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._seen = self._stamps()

    def _stamps(self) -> dict[str, tuple[int, int, int] | None]:
        stamps: dict[str, tuple[int, int, int] | None] = {}
        for path in (self.keyfile, self.certfile, self.ca_certs):
            if path is None:
                continue
            try:
                st = Path(path).resolve().stat()
                stamps[str(path)] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                stamps[str(path)] = None
        return stamps

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamps = self._stamps()
            if stamps == self._seen:
                continue
            try:
                if self.certfile is not None:
                    self.context.load_cert_chain(self.certfile, self.keyfile)
                if self.ca_certs is not None:
                    self.context.load_verify_locations(self.ca_certs)
            except (ssl.SSLError, OSError) as e:
                # Half-written files are common mid-rotation: keep the old certificate, retry.
                logger.warning("reloading the TLS certificate failed (keeping the old one): %s", e)
                continue
            self._seen = stamps
            logger.info("reloaded the TLS certificate from %s", self.certfile)
