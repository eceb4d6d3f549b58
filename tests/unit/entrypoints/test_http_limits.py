"""The launcher's HTTP framing and connection limits, on raw sockets against serve_http.

Each test runs the real serve_http (the uvicorn protocol Pagoda uses) in front of the
fake engine, so that what is tested is the protocol implementation actually in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

from fake_engine import FakeEngineClient

from pagoda.config import ServerConfig
from pagoda.entrypoints.launcher import bind_socket, bind_unix_socket, serve_http
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.tokenizer import Tokenizer

DEADLINE_S = 30.0  # generous: the machine may be busy


@contextlib.asynccontextmanager
async def serving(
    tokenizer: Tokenizer, config: ServerConfig | None = None, **kwargs: Any
) -> AsyncIterator[int]:
    """serve_http on a free port for the duration; yields the port; SIGTERM stops it."""
    sock = bind_socket("127.0.0.1", 0)
    async with serving_on(sock, tokenizer, config, **kwargs):
        yield sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serving_on(
    sock: socket.socket, tokenizer: Tokenizer, config: ServerConfig | None = None, **kwargs: Any
) -> AsyncIterator[None]:
    app = build_app(FakeEngineClient(tokenizer), config or ServerConfig())
    task = asyncio.create_task(serve_http(app, sock, log_level="warning", **kwargs))
    try:
        for _ in range(200):
            if b" 200 " in await exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"):
                break
            await asyncio.sleep(0.05)
        yield
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(task, DEADLINE_S) == 0


async def exchange(where: int | socket.socket, data: bytes) -> bytes:
    """Sends data on a new connection (to a port, or a listening socket's address) and returns
    what comes back until the server closes it or a response head and any body given by
    Content-Length have arrived."""
    try:
        if isinstance(where, int):
            reader, writer = await asyncio.open_connection("127.0.0.1", where)
        elif where.family == socket.AF_UNIX:
            reader, writer = await asyncio.open_unix_connection(where.getsockname())
        else:
            reader, writer = await asyncio.open_connection(*where.getsockname()[:2])
    except OSError:
        return b""
    try:
        writer.write(data)
        return await asyncio.wait_for(read_response(reader), DEADLINE_S)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = await reader.read(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            while len(body) < int(value):
                part = await reader.read(65536)
                if not part:
                    break
                body += part
    return head + b"\r\n\r\n" + body


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 4 * DEADLINE_S))


# ---- framing ----------------------------------------------------------------------------


def test_content_length_with_chunked_is_refused(tokenizer) -> None:
    # Behind a proxy that frames by Content-Length, the chunked body would smuggle a request.
    body = b'{"prompt": "Hi"}'
    smuggle = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(body) + 9, len(body), body)
    )
    chunked = (
        b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )

    async def main() -> None:
        async with serving(tokenizer) as port:
            assert status(await exchange(port, smuggle)) == 400
            assert status(await exchange(port, chunked)) == 200

    run(main())


# ---- header limits ------------------------------------------------------------------------


def head_with(headers: list[bytes]) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(headers) + b"\r\n"


def test_default_header_limits(tokenizer) -> None:
    # Large tokens and cookies fit; a 100 KiB header line does not.
    async def main() -> None:
        async with serving(tokenizer) as port:
            big = head_with([b"Cookie: " + b"c" * (40 << 10) + b"\r\n"])
            assert status(await exchange(port, big)) == 200
            huge = head_with([b"X-Big: " + b"a" * (100 << 10) + b"\r\n"])
            assert status(await exchange(port, huge)) == 431
            many = head_with([b"X-H%d: v\r\n" % i for i in range(300)])
            assert status(await exchange(port, many)) == 431
            fine = head_with([b"X-H%d: v\r\n" % i for i in range(200)])
            assert status(await exchange(port, fine)) == 200

    run(main())


def test_header_limits_from_the_flags(tokenizer) -> None:
    config = ServerConfig(h11_max_incomplete_event_size=8 << 10, h11_max_header_count=10)

    async def main() -> None:
        async with serving(tokenizer, config) as port:
            big = head_with([b"X-Big: " + b"a" * (10 << 10) + b"\r\n"])
            assert status(await exchange(port, big)) == 431
            many = head_with([b"X-H%d: v\r\n" % i for i in range(12)])
            assert status(await exchange(port, many)) == 431
            fine = head_with([b"X-H%d: v\r\n" % i for i in range(5)])
            assert status(await exchange(port, fine)) == 200

    run(main())


# ---- slow clients and open connections ------------------------------------------------------


async def trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, every_s: float
) -> bytes:
    """Sends head one byte at a time; returns what the server answered when it closed."""
    answer = asyncio.ensure_future(reader.read())
    try:
        for byte in head:
            if answer.done():
                break
            writer.write(bytes([byte]))
            await asyncio.wait({answer}, timeout=every_s)
        return await asyncio.wait_for(answer, DEADLINE_S)
    finally:
        writer.close()


def test_a_request_head_sent_too_slowly_is_timed_out(tokenizer) -> None:
    config = ServerConfig(header_read_timeout=1.0)
    head = head_with([b"X-Pad: " + b"p" * 400 + b"\r\n"])

    async def main() -> None:
        async with serving(tokenizer, config) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert status(await trickle(reader, writer, head, every_s=0.1)) == 408
            # A silent connection is closed too.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), DEADLINE_S) is not None
            writer.close()
            # A kept-alive connection: its next head has the same deadline.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status(await read_response(reader)) == 200
            assert status(await trickle(reader, writer, head, every_s=0.1)) == 408
            # A head sent at once is unaffected.
            assert status(await exchange(port, head)) == 200

    run(main())


def test_open_connections_are_capped(tokenizer) -> None:
    config = ServerConfig(max_connections=4)

    async def main() -> None:
        async with serving(tokenizer, config) as port:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            await asyncio.sleep(0.2)
            assert status(await exchange(port, head_with([]))) == 503
            _, writer = idle.pop()
            writer.close()
            await asyncio.sleep(0.2)
            assert status(await exchange(port, head_with([]))) == 200
            for _, writer in idle:
                writer.close()

    run(main())


# ---- where the server listens -----------------------------------------------------------------


def test_root_path_through_the_server(tokenizer) -> None:
    # The prefix was applied twice (by uvicorn and by the app): /llm/v1/models was a 404.
    async def main() -> None:
        async with serving(tokenizer, ServerConfig(root_path="/llm"), root_path="/llm") as port:
            for path in (b"/llm/v1/models", b"/v1/models", b"/llm/health"):
                head = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
                assert status(await exchange(port, head)) == 200, path

    run(main())


def test_unix_socket(tokenizer, tmp_path) -> None:
    sock = bind_unix_socket(str(tmp_path / "pagoda.sock"))

    async def main() -> None:
        async with serving_on(sock, tokenizer):
            head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
            assert b"fake-model" in await exchange(sock, head)

    run(main())
