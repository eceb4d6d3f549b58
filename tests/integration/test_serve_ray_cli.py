"""`pagoda serve-ray` as users run it: a local Ray cluster of its own, Pagoda's own server in
front (TLS as `pagoda serve` does it), drained on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import STARTUP_TIMEOUT_S, free_port
from test_lifecycle import (
    live_certificate,
    served_common_name,
    swap_certificate,
    wait_for_common_name,
)

pytestmark = pytest.mark.slow


def start_serve_ray(port: int, *flags: str, scheme: str = "http") -> subprocess.Popen:
    """`pagoda serve-ray` of the default model on port, once its /health answers 200."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"pagoda-serve-ray-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve-ray", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "m", "--kv-cache-memory", "256M", *flags],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + STARTUP_TIMEOUT_S * 2  # Ray, then the engine
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError(log.read_text()[-3000:])
        try:
            url = f"{scheme}://127.0.0.1:{port}/health"
            if httpx.get(url, timeout=1, verify=False).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def assert_gone(family: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 60
    alive = family
    while alive and time.monotonic() < deadline:
        alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, alive


def test_sigterm_drains_streams_in_flight_and_leaves_nothing() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_serve_ray(port, "--shutdown-timeout", "60")
    try:
        family = psutil.Process(process.pid).children(recursive=True)

        chunks: list[dict] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "m", "prompt": "Tell me a story", "max_tokens": 200,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(60)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        body = {"model": "m", "prompt": "x", "max_tokens": 2}
        late = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert late.status_code == 503
        reader.join(120)
        assert process.wait(120) == 0
    finally:
        stop(process)
    # The stream in flight finished whole; nothing of Ray or the engine is left.
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 200
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert_gone(family)


def test_tls_with_certificate_reload(tmp_path: Path) -> None:
    live_key, live_cert = live_certificate(tmp_path, "first")
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    process = start_serve_ray(
        port, "--ssl-keyfile", str(live_key), "--ssl-certfile", str(live_cert),
        "--enable-ssl-refresh", scheme="https",
    )  # fmt: skip
    try:
        family = psutil.Process(process.pid).children(recursive=True)
        assert served_common_name(port) == "first"
        body = {"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, verify=False, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)

        swap_certificate(tmp_path, live_key, live_cert, "second")
        wait_for_common_name(port, "second", within_s=10)
        assert httpx.get(f"{url}/health", verify=False, timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        stop(process)
    assert_gone(family)
