"""The path without Ray: two `pagoda serve` behind vllm-router's cache-aware policy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import Server, free_port, stop_process_group, wait_until_ready

pytestmark = pytest.mark.slow

ROUTER = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")


class Router:
    """vllm-router (a Rust binary from PyPI) in front of the given servers."""

    def __init__(self, workers: list[Server], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-router-{self.port}.log"
        command = [
            ROUTER,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--worker-urls",
            *[w.url for w in workers],
            *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self) -> Router:
        wait_until_ready(self.process, f"{self.url}/v1/models", self.log, "router")
        return self

    def stop(self) -> None:
        stop_process_group(self.process)


@pytest.fixture
def two_servers(start_server, tiny_model_dir) -> list[Server]:
    model = str(tiny_model_dir("llama"))
    return [start_server(model, "--served-model-name", "tiny") for _ in range(2)]


@pytest.fixture
def router(two_servers: list[Server]) -> Iterator[Router]:
    r = Router(two_servers, "--policy", "cache_aware", "--log-level", "warning")
    try:
        yield r.wait_ready()
    finally:
        r.stop()
    assert r.process.poll() is not None


def served_by(servers: list[Server], send) -> tuple[object, int]:
    """Sends one request (send()) and tells which server answered it, by /metrics."""
    before = [s.metric("vllm:request_success_total") for s in servers]
    result = send()
    after = [s.metric("vllm:request_success_total") for s in servers]
    (index,) = [i for i in range(len(servers)) if after[i] > before[i]]
    return result, index


def test_router_answers_as_one_server_and_keeps_prefixes_together(two_servers, router):
    direct = openai.OpenAI(base_url=f"{two_servers[0].url}/v1", api_key="x", max_retries=0)
    routed = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0)
    kwargs = dict(model="tiny", max_tokens=12, temperature=0)
    for prompt in ["Hello there", "Once upon a time"]:
        expected = direct.completions.create(prompt=prompt, **kwargs).choices[0].text
        assert routed.completions.create(prompt=prompt, **kwargs).choices[0].text == expected
        stream = routed.completions.create(prompt=prompt, stream=True, **kwargs)
        assert "".join(c.choices[0].text for c in stream) == expected

    # Two long shared prefixes, 10 requests each, interleaved: each stays on one server.
    systems = [
        "You are a pirate. Answer every question in pirate speech. " * 3,
        "You are a careful accountant who double-checks every number. " * 3,
    ]
    placed: dict[int, Counter[int]] = {0: Counter(), 1: Counter()}
    for i in range(10):
        for s, system in enumerate(systems):

            def send(prompt: str = f"{system}Question {i}: why?") -> object:
                return routed.completions.create(prompt=prompt, model="tiny", max_tokens=2)

            _, index = served_by(two_servers, send)
            placed[s][index] += 1
    for s in placed:
        (_, top), *_ = placed[s].most_common(1)
        assert top >= 9, placed  # at least 90 % on one server
    # The caches show it: after each prefix's first request, its full blocks are hits
    # (one token per byte; blocks of 16 tokens) on at least 90 % of the others.
    hits = sum(server.metric("vllm:prefix_cache_hits_total") for server in two_servers)
    assert hits >= 0.9 * 18 * (len(systems[0]) - 16), hits
