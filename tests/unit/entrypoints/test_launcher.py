"""The launcher's listening socket."""

from __future__ import annotations

import asyncio
import socket

from pagoda.entrypoints.launcher import bind_socket


def test_accepted_connections_have_nagle_off() -> None:
    # With Nagle's algorithm on, a response written in two parts waits for the client's
    # delayed ACK: 40 ms on every request of a reused (keep-alive) connection.
    listener = bind_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    nodelay: list[int] = []

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            nodelay.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            while not nodelay:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert nodelay == [1]
