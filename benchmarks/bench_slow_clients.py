"""Slow senders of request heads against a running server: are they closed, does it still answer?

    .venv/bin/python benchmarks/bench_slow_clients.py --base-url http://127.0.0.1:8000 \
        [--connections 500] [--interval 2] [--duration 45]

Opens --connections connections that each send a request head one byte every --interval
seconds (as a slowloris client does), and meanwhile asks /health once a second on a fresh
connection. Prints how many slow connections the server had closed after --duration
seconds, the latency of /health meanwhile, and a JSON record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from urllib.parse import urlparse

HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"


async def slow_client(host: str, port: int, interval: float, stop: float) -> float | None:
    """Seconds until the server closed the connection, or None if it never did."""
    start = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0.0
    closed = asyncio.ensure_future(reader.read())
    try:
        for byte in HEAD:
            if closed.done():
                return time.monotonic() - start
            writer.write(bytes([byte]))
            await asyncio.wait({closed}, timeout=min(interval, max(0.0, stop - time.monotonic())))
            if time.monotonic() >= stop:
                break
        return time.monotonic() - start if closed.done() else None
    finally:
        closed.cancel()
        writer.close()


async def health_probe(host: str, port: int, stop: float) -> list[float]:
    latencies = []
    while time.monotonic() < stop:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            if b" 200 " in line:
                latencies.append(time.monotonic() - t0)
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(1.0)
    return latencies


async def run(args: argparse.Namespace) -> dict:
    url = urlparse(args.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    stop = time.monotonic() + args.duration
    slow = [slow_client(host, port, args.interval, stop) for _ in range(args.connections)]
    results, latencies = await asyncio.gather(asyncio.gather(*slow), health_probe(host, port, stop))
    closed = sorted(r for r in results if r is not None)
    return {
        "connections": args.connections,
        "interval_s": args.interval,
        "duration_s": args.duration,
        "closed": len(closed),
        "closed_after_s_p50": statistics.median(closed) if closed else None,
        "health_ok": len(latencies),
        "health_p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "health_max_ms": 1000 * max(latencies) if latencies else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=45.0)
    record = asyncio.run(run(p.parse_args()))
    print(
        f"{record['closed']}/{record['connections']} slow connections closed by the server "
        f"(median after {record['closed_after_s_p50']} s); /health answered "
        f"{record['health_ok']} times, p50 {record['health_p50_ms']} ms"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
