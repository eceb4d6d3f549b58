"""Real `pagoda serve` processes on free ports, and checks that none outlives its test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(process: subprocess.Popen, url: str, log: Path, what: str) -> None:
    """Polls url until it answers 200; raises with the log if the process exits or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1, verify=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready in {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the whole group if it has not exited within 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


class Server:
    """A `pagoda serve` subprocess in its own process group."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, scheme: str = "http") -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"pagoda-test-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "pagoda",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "256M",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.family: list[psutil.Process] = []

    def wait_ready(self) -> Server:
        wait_until_ready(self.process, f"{self.url}/health", self.log, "server")
        root = psutil.Process(self.process.pid)
        self.family = [root, *root.children(recursive=True)]
        return self

    @property
    def engine_process(self) -> psutil.Process:
        (engine,) = [p for p in self.family[1:] if "spawn_main" in " ".join(p.cmdline())]
        return engine

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        stop_process_group(self.process)

    def assert_no_process_left(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            alive = [p for p in self.family if p.is_running() and p.status() != "zombie"]
            if not alive:
                return
            time.sleep(0.1)
        raise AssertionError(f"processes left behind: {alive}")

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-reason metric line of /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"{name} is not in /metrics"
        return total


@pytest.fixture
def start_server() -> Iterator:
    """Starts servers for one test; stops them and checks that nothing is left behind."""
    servers: list[Server] = []

    def start(
        *args: str, env: dict[str, str] | None = None, wait: bool = True, scheme: str = "http"
    ) -> Server:
        server = Server(*args, env=env, scheme=scheme)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()
        server.assert_no_process_left()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server on the default model, shared by a module's tests."""
    s = Server().wait_ready()
    yield s
    s.stop()
    s.assert_no_process_left()
