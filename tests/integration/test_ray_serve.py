"""Pagoda replicas on Ray Serve: a local Ray cluster started here, stopped here, nothing left.

Each test deploys its application at "/" and deletes it; the cluster is the module's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import ray
from conftest import free_port  # tests/integration/conftest.py
from ray import serve

from pagoda.config import EngineConfig, ServerConfig
from pagoda.deploy.ray import RayDeployConfig, pagoda_app
from pagoda.deploy.replica_client import REPLICA_HEADER

pytestmark = pytest.mark.slow

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
DEADLINE_S = 180  # generous: replicas start engines on a busy 2-core machine


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.5)


class Cluster:
    """A local Ray cluster with Serve's proxy on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def deploy(self, model: Path, deploy: RayDeployConfig) -> None:
        engine = EngineConfig.from_flags(
            model, dtype="float32", kv_cache_memory=64 << 20, served_model_names=("tiny",)
        )
        server = ServerConfig(chat_template=TEMPLATE)
        serve.run(pagoda_app(engine, server, deploy), name="pagoda", route_prefix="/")

    def running_replicas(self) -> int:
        app = serve.status().applications.get("pagoda")
        if app is None:
            return 0
        return app.deployments["EngineReplica"].replica_states.get("RUNNING", 0)

    def complete(self, prompt: str, max_tokens: int = 8) -> httpx.Response:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        return response


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    ray.init(
        num_cpus=4,  # logical: two engine replicas at one CPU each, and room to replace one
        include_dashboard=False,
        object_store_memory=100 << 20,
        log_to_driver=False,
    )
    family: list[psutil.Process] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": c.port})
        yield c
    finally:
        family = psutil.Process().children(recursive=True)
        serve.shutdown()
        ray.shutdown()
    deadline = time.monotonic() + 60
    alive = family
    while alive and time.monotonic() < deadline:
        alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, f"processes left behind: {alive}"


@pytest.fixture
def two_replicas(cluster: Cluster, tiny_model_dir) -> Iterator[Cluster]:
    deploy = RayDeployConfig(num_replicas=2, health_check_period_s=1, metrics_period_s=1)
    cluster.deploy(tiny_model_dir("llama"), deploy)
    yield cluster
    serve.delete("pagoda")


def test_two_replicas_answer_as_one_pagoda_serve(
    two_replicas, start_server, tiny_model_dir, tmp_path
) -> None:
    template = Path(tmp_path) / "chat.jinja"
    template.write_text(TEMPLATE)
    model = str(tiny_model_dir("llama"))
    single = start_server(model, "--served-model-name", "tiny", "--chat-template", str(template))
    direct = openai.OpenAI(base_url=f"{single.url}/v1", api_key="unused", max_retries=0)
    via_ray = two_replicas.client

    def answers(client: openai.OpenAI, prompt: str) -> list[str]:
        kwargs = dict(model="tiny", max_tokens=12, temperature=0)
        messages = [{"role": "user", "content": prompt}]
        completion = client.completions.create(prompt=prompt, **kwargs).choices[0].text
        stream = client.completions.create(prompt=prompt, stream=True, **kwargs)
        streamed = "".join(c.choices[0].text for c in stream)
        chat = client.chat.completions.create(messages=messages, **kwargs)
        chat_streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(messages=messages, stream=True, **kwargs)
            if c.choices
        )
        return [completion, streamed, chat.choices[0].message.content or "", chat_streamed]

    prompts = ["Hello there", "A different start", "Once upon a time", "zebra crossing"]
    for prompt in prompts:
        expected = answers(direct, prompt)
        assert len(expected[0]) > 0
        assert answers(via_ray, prompt) == expected
    # Prompts with nothing in common spread over both replicas: Ray's router sends a prefix
    # it has not seen to the replica holding the least prompt text so far.
    served = set()
    for i in range(20):
        served.add(
            two_replicas.complete(f"{chr(65 + i)} fresh start number {i}").headers[REPLICA_HEADER]
        )
        if len(served) == 2:
            break
    assert len(served) == 2


def test_prefix_affinity_keeps_a_system_prompt_on_one_replica(two_replicas):
    systems = [
        "You are a pirate. Answer every question in pirate speech. " * 3,
        "You are a careful accountant who double-checks every number. " * 3,
    ]
    served: dict[int, Counter[str]] = {0: Counter(), 1: Counter()}
    cached: dict[int, list[int]] = {0: [], 1: []}
    for i in range(20):
        for s, system in enumerate(systems):
            response = two_replicas.complete(f"{system}Question {i}: why?", max_tokens=2)
            assert response.status_code == 200, response.text
            served[s][response.headers[REPLICA_HEADER]] += 1
            cached[s].append(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    for s, system in enumerate(systems):
        (_, top), *_ = served[s].most_common(1)
        assert top >= 18, served  # at least 90 % on one replica
        # After the first request, the system prompt's full blocks come from the cache.
        hits = [c for c in cached[s][1:] if c >= len(system) - 16]
        assert len(hits) >= 18, cached[s]

    # The ingress's /metrics has each replica's vLLM-named series, labelled by replica:
    # the replica that took a system prompt counts its hits.
    def hits_of(replica: str) -> float:
        text = httpx.get(f"{two_replicas.url}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if f'replica="{replica}"' in line]
        hits = [line for line in lines if line.startswith("vllm:prefix_cache_hits_total")]
        return float(hits[0].rsplit(" ", 1)[1]) if hits else 0.0

    for s, system in enumerate(systems):
        (replica, _), *_ = served[s].most_common(1)
        least = 18 * (len(system) - 16)
        wait_for(lambda r=replica, n=least: hits_of(r) >= n, "hits in /metrics", 60)


def replica_processes() -> dict[str, int]:
    """replica id -> the pid of its process (its engine runs in it), asked of replicas picked
    at random until both answered (a call without a prompt goes to the less loaded of two)."""
    engines = serve.get_deployment_handle("EngineReplica", app_name="pagoda")
    found: dict[str, int | None] = {}
    for _ in range(50):
        replica, pid = engines.engine_info.remote().result(timeout_s=30)
        found[replica] = pid
        if len(found) == 2:
            break
    return found


def health(cluster: Cluster) -> int:
    return httpx.get(f"{cluster.url}/health", timeout=10).status_code


def test_failover_when_a_replica_dies_with_its_engine(two_replicas):
    """The replica's process is killed, engine and all (a replica's engine runs in it): what
    an out-of-memory kill or a crash in native code does. An engine that raises or hangs
    without killing the process leaves its client errored (tests/unit/engine/
    test_inproc_client.py), which fails the replica's health check: Ray replaces it too."""
    prompt = "The doomed replica's prompt"
    victim_replica = two_replicas.complete(prompt).headers[REPLICA_HEADER]
    before = replica_processes()
    assert len(before) == 2
    victim = psutil.Process(before[victim_replica])
    assert victim.pid != psutil.Process().pid

    # Streams in flight on the victim (the same prompt: affinity sends them there).
    started = threading.Barrier(5)

    def stream() -> str:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 480, "stream": True}
        with httpx.stream(
            "POST", f"{two_replicas.url}/v1/completions", json=body, timeout=120
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(lines)
            started.wait(timeout=60)
            return "\n".join([first, *lines])

    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(stream) for _ in range(4)]
        started.wait(timeout=60)
        victim.kill()
        streams = [f.result(timeout=120) for f in in_flight]
    # Each stream ends: with an error event where the dead engine held it, none hangs.
    assert all(s.rstrip().endswith("data: [DONE]") for s in streams)
    assert any('"error"' in s and "engine is dead" in s for s in streams), streams

    # New requests, same prompt included, succeed (on the other replica, or a new one).
    for i in range(6):
        response = two_replicas.complete(f"{prompt} {i}")
        assert response.status_code == 200, response.text
        assert response.headers[REPLICA_HEADER] != victim_replica
    # /health stays 200 while the other replica's engine lives, before and after the dead
    # replica has reported its engine dead (reports come every second here).
    for _ in range(3):
        assert health(two_replicas) == 200
        time.sleep(1.0)
    # Ray replaces the replica: two running again, the victim's id gone.
    wait_for(lambda: two_replicas.running_replicas() == 2, "the dead replica replaced")
    wait_for(lambda: victim_replica not in replica_processes(), "the dead replica gone")
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    assert two_replicas.complete(prompt).status_code == 200


def test_health_is_503_while_no_replica_has_a_live_engine(two_replicas):
    """Both replicas' processes killed: no live engine reports in, /health is 503 until Ray's
    replacements do."""
    before = replica_processes()
    assert len(before) == 2
    assert health(two_replicas) == 200
    victims = [psutil.Process(pid) for pid in before.values()]
    for victim in victims:
        victim.kill()
    wait_for(lambda: health(two_replicas) == 503, "/health 503 with both engines dead", 60)
    # Ray replaces both replicas; their new engines make the ingress healthy again.
    wait_for(lambda: health(two_replicas) == 200, "/health 200 after the replacements")
    assert two_replicas.complete("Back again").status_code == 200


def test_autoscaling_up_under_a_burst_and_down_when_idle(cluster, tiny_model_dir):
    deploy = RayDeployConfig(
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=1,
        downscale_delay_s=5,
    )
    cluster.deploy(tiny_model_dir("llama"), deploy)
    try:
        assert cluster.running_replicas() == 1
        stop = threading.Event()

        def keep_busy(i: int) -> None:
            while not stop.is_set():
                cluster.complete(f"burst {i}", max_tokens=64)

        with ThreadPoolExecutor(6) as pool:
            for i in range(6):
                pool.submit(keep_busy, i)
            try:
                wait_for(lambda: cluster.running_replicas() == 2, "scaled up to 2")
            finally:
                stop.set()
        wait_for(lambda: cluster.running_replicas() == 1, "scaled back down to 1")
        assert cluster.complete("after the burst").status_code == 200
    finally:
        serve.delete("pagoda")
