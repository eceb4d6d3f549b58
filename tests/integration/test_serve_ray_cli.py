"""`pagoda serve-ray` as users run it: a local Ray cluster of its own, drained on SIGTERM."""

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

pytestmark = pytest.mark.slow


def test_sigterm_drains_streams_in_flight_and_leaves_nothing() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"pagoda-serve-ray-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve-ray", "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "m", "--kv-cache-memory", "256M", "--shutdown-timeout", "60"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S * 2  # Ray, then the engine
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
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
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # The stream in flight finished whole; nothing of Ray or the engine is left.
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 200
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 60
    alive = family
    while alive and time.monotonic() < deadline:
        alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, alive
