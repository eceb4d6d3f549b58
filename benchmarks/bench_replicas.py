"""Pagoda replicas on Ray Serve against one `pagoda serve`, on this machine.

Measurements, each printed as one line and kept in a JSON record:
  latency   the ingress's added latency: p50 of a one-token request, sequential, through
            `pagoda serve-ray --num-replicas 1` against `pagoda serve` directly, both servers
            up at once and the requests alternating between them, so that both see the
            machine in the same state (and with --no-prefix-affinity too when
            latency_load_only is also given);
  affinity, affinity_load_only
            a trace of 8 system prompts x --per-system questions (200: 1,600 streamed
            requests, shuffled, 4 in flight) on 2 replicas with small KV caches, routed by
            prefix affinity, or by Ray's default (the less loaded of two random replicas):
            the share of prompt tokens served from the prefix cache, and TTFT;
  throughput  `pagoda bench serve` (random 256 in / 128 out, 64 prompts, 32 in flight)
            against `pagoda serve`, and 1 and 2 replicas, with the cores each process used
            meanwhile (CPU seconds / wall seconds: each replica, the server, Ray's others).

    python benchmarks/bench_replicas.py [--model PATH]
        [--only latency,latency_load_only,affinity,affinity_load_only,throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

SEED = 0
GAP_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pagoda serve` or `pagoda serve-ray` as a subprocess in its own session."""

    def __init__(self, command: str, model: str | None, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model_args = [model] if model else []
        argv = [sys.executable, "-m", "pagoda", command, *model_args, "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--served-model-name", "m", *args]
        self.log = open(f"/tmp/bench-replicas-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started = time.monotonic()
        while time.monotonic() - started < 300:
            assert self.process.poll() is None, f"server exited; see {self.log.name}"
            try:
                body = {"model": "m", "prompt": "Hi", "max_tokens": 1}
                if httpx.post(f"{self.url}/v1/completions", json=body, timeout=5).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready; see {self.log.name}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def one_token_latencies(*urls: str, n: int = 200) -> list[list[float]]:
    """n one-token requests to each url (after 10 warm-ups each), alternating between them.

    Between two servers' requests, a pause of GAP_S: an engine's OpenMP threads spin for a
    while after a step before they sleep, and would take the cores from the other server.
    """
    body = {"model": "m", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    out: list[list[float]] = [[] for _ in urls]
    with httpx.Client(timeout=60) as client:
        for i in range(n + 10):
            for url, times in zip(urls, out):
                if len(urls) > 1:
                    time.sleep(GAP_S)
                start = time.perf_counter()
                client.post(f"{url}/v1/completions", json=body).raise_for_status()
                if i >= 10:  # warm-up
                    times.append(time.perf_counter() - start)
    return out


def measure_latency(model: str | None, load_only: bool) -> dict:
    direct = Server("serve", model)
    try:
        ray = Server("serve-ray", model, "--num-replicas", "1")
        try:
            direct_s, ray_s = one_token_latencies(direct.url, ray.url)
        finally:
            ray.stop()
    finally:
        direct.stop()
    d50, r50 = statistics.median(direct_s) * 1e3, statistics.median(ray_s) * 1e3
    result = {
        "direct_p50_ms": round(d50, 2),
        "ray_p50_ms": round(r50, 2),
        "added_p50_ms": round(r50 - d50, 2),
        "direct_p90_ms": round(percentile(direct_s, 90) * 1e3, 2),
        "ray_p90_ms": round(percentile(ray_s, 90) * 1e3, 2),
    }
    if load_only:
        server = Server("serve-ray", model, "--num-replicas", "1", "--no-prefix-affinity")
        try:
            (times,) = one_token_latencies(server.url)
            result["ray_load_only_p50_ms"] = round(statistics.median(times) * 1e3, 2)
        finally:
            server.stop()
    return result


WORDS = "the of and to in is that for it as was with be by on not he this are or his".split()


def trace(num_systems: int = 8, per_system: int = 25, system_words: int = 300) -> list[str]:
    rng = random.Random(SEED)
    systems = [
        f"System {i}: " + " ".join(rng.choice(WORDS) for _ in range(system_words))
        for i in range(num_systems)
    ]
    prompts = [
        f"{system}\nQuestion {j}: {' '.join(rng.choice(WORDS) for _ in range(8))}?"
        for system in systems
        for j in range(per_system)
    ]
    rng.shuffle(prompts)
    return prompts


def streamed(url: str, prompt: str) -> tuple[float, int, int]:
    """(TTFT s, prompt tokens, cached prompt tokens) of one streamed request."""
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    usage = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    assert ttft is not None and usage is not None
    return ttft, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def measure_affinity(
    model: str | None, kv_cache_memory: str, per_system: int, load_only: bool
) -> dict:
    """The trace on 2 replicas, routed by prefix affinity or (load_only) by load alone."""
    prompts = trace(per_system=per_system)
    flags = ["--no-prefix-affinity"] if load_only else []
    server = Server(
        "serve-ray", model, "--num-replicas", "2", "--kv-cache-memory", kv_cache_memory, *flags
    )
    try:
        with ThreadPoolExecutor(4) as pool:
            rows = list(pool.map(streamed, [server.url] * len(prompts), prompts))
    finally:
        server.stop()
    ttfts = [r[0] for r in rows]
    return {
        "hit_rate": round(sum(r[2] for r in rows) / sum(r[1] for r in rows), 3),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1),
        "ttft_p90_ms": round(percentile(ttfts, 90) * 1e3, 1),
    }


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of root's process tree, by role: `replica PID` for
    each Ray Serve replica of EngineReplica (its engine runs in it), `engine` for `pagoda
    serve`'s engine process, `server` for root itself, `ray` for the rest."""
    out: dict[str, float] = defaultdict(float)
    top = psutil.Process(root)
    for process in [top, *top.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if process.pid == root:
            role = "server"
        elif "EngineReplica" in command:
            role = f"replica {process.pid}"
        elif "multiprocessing" in command:
            role = "engine"
        else:
            role = "ray"
        out[role] += times.user + times.system
    return out


def measure_throughput(model: str | None) -> dict:
    result = {}
    for replicas in (0, 1, 2):  # 0: `pagoda serve` itself
        if replicas == 0:
            server = Server("serve", model)
        else:
            server = Server("serve-ray", model, "--num-replicas", str(replicas))
        out = Path(f"/tmp/bench-replicas-{replicas}.json")
        try:
            cpu_before, start = cpu_seconds(server.process.pid), time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "pagoda", "bench", "serve", "--base-url", server.url,
                 "--model", "m", "--num-prompts", "64", "--max-concurrency", "32",
                 "--random-input-len", "256", "--random-output-len", "128", "--ignore-eos",
                 "--seed", "1032", "--save-result", "--result-filename", str(out),
                 "--disable-tqdm"],
                check=True,
            )  # fmt: skip
            cpu_after, wall = cpu_seconds(server.process.pid), time.monotonic() - start
        finally:
            server.stop()
        record = json.loads(out.read_text())
        # Replicas by their order of pid, so that the record names no pid.
        roles = sorted(cpu_after, key=lambda r: (not r.startswith("replica"), len(r), r))
        cores = {}
        for n, role in enumerate(roles):
            name = f"replica_{n}" if role.startswith("replica") else role
            cores[name] = round((cpu_after[role] - cpu_before.get(role, 0.0)) / wall, 2)
        result[f"{replicas}_replicas" if replicas else "pagoda_serve"] = {
            "output_tok_s": round(record["output_throughput"], 1),
            "ttft_p50_ms": round(record["ttft_ms"]["median"], 1),
            "tpot_p50_ms": round(record["tpot_ms"]["median"], 1),
            "cores": cores,
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument(
        "--only", default="latency,latency_load_only,affinity,affinity_load_only,throughput"
    )
    p.add_argument("--kv-cache-memory", default="64M", help="per replica in the affinity trace")
    p.add_argument("--per-system", type=int, default=200, help="requests per system prompt")
    args = p.parse_args()
    record: dict = {}
    parts = args.only.split(",")
    if "latency" in parts:
        record["latency"] = measure_latency(args.model, "latency_load_only" in parts)
        print("latency", json.dumps(record["latency"]), flush=True)
    for part in ("affinity", "affinity_load_only"):
        if part in parts:
            record[part] = measure_affinity(
                args.model, args.kv_cache_memory, args.per_system, part == "affinity_load_only"
            )
            print(part, json.dumps(record[part]), flush=True)
    if "throughput" in parts:
        record["throughput"] = measure_throughput(args.model)
        print("throughput", json.dumps(record["throughput"]), flush=True)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
