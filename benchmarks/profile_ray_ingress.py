"""Where the Ray ingress's added latency goes: each hop of a one-token request timed alone.

First `pagoda serve` alone (direct_models, direct_one_token: the same two HTTP requests with
no Ray), then `pagoda serve-ray --num-replicas 1` (serve_ray_models, serve_ray_one_token:
Pagoda's own server in the serve-ray process, one Ray call to the replica), then a local
Ray cluster with one replica of the model (the embedded default unless --model) behind
pagoda_app(), the application for Serve users:
  http_models     GET /v1/models through Serve's proxy: proxy + ingress, no replica call
  http_one_token  a one-token completion through Serve's proxy (the whole path)
  handle_unary    a no-op replica method called from this driver: one Ray call
  handle_stream   the replica's generate() for a one-token request, called from this driver
  handle_final    the replica's generate_final() (one unary call with the final output)

    python benchmarks/profile_ray_ingress.py [--model PATH] [-n 200] [--replica-num-cpus N]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import ray
from ray import serve

from pagoda.config import EngineConfig, ServerConfig
from pagoda.deploy.config import RayDeployConfig
from pagoda.deploy.ray import EngineReplica, pagoda_app
from pagoda.deploy.replica_client import ReplicaRequest
from pagoda.model_files import resolve_model_path
from pagoda.sampling_params import RequestOutputKind, SamplingParams

BODY = {"model": "m", "prompt": "Hello", "max_tokens": 1, "temperature": 0}


def p50_ms(call: Callable[[], object], n: int) -> float:
    for _ in range(10):  # warm-up
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def ready(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--replica-num-cpus", type=float, default=None, help="default: serve-ray's")
    args = p.parse_args()
    engine = EngineConfig.from_flags(
        resolve_model_path(args.model), served_model_names=("m",), kv_cache_memory=64 << 20
    )
    result: dict[str, float] = {}
    url = f"http://127.0.0.1:{args.port}"
    model = [args.model] if args.model else []
    for name, command in (("direct", "serve"), ("serve_ray", "serve-ray")):
        server = subprocess.Popen(
            [sys.executable, "-m", "pagoda", command, *model, "--port", str(args.port),
             "--served-model-name", "m", "--kv-cache-memory", "64M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with httpx.Client(timeout=60) as client:
                while not ready(client, url):
                    assert server.poll() is None, f"pagoda {command} exited"
                    time.sleep(0.5)
                get = lambda: client.get(f"{url}/v1/models")  # noqa: E731
                result[f"{name}_models"] = p50_ms(get, args.n)
                post = lambda: client.post(f"{url}/v1/completions", json=BODY).raise_for_status()  # noqa: E731
                result[f"{name}_one_token"] = p50_ms(post, args.n)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(60)
    print(json.dumps(result), flush=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        deploy = RayDeployConfig(num_replicas=1, replica_num_cpus=args.replica_num_cpus)
        app = pagoda_app(engine, ServerConfig(), deploy)
        serve.run(app, name="pagoda", route_prefix="/")
        with httpx.Client(timeout=60) as client:
            result["http_models"] = p50_ms(lambda: client.get(f"{url}/v1/models"), args.n)
            post = lambda: client.post(f"{url}/v1/completions", json=BODY).raise_for_status()  # noqa: E731
            result["http_one_token"] = p50_ms(post, args.n)
        print(json.dumps(result), flush=True)
        replica = serve.get_deployment_handle("EngineReplica", app_name="pagoda")
        result["handle_unary"] = p50_ms(
            lambda: replica.engine_info.remote().result(timeout_s=30), args.n
        )
        ids = [19556]

        def request(kind: RequestOutputKind) -> ReplicaRequest:
            params = SamplingParams(temperature=0, max_tokens=1, output_kind=kind)
            return ReplicaRequest(f"r{time.perf_counter_ns()}", ids, None, params)

        streaming = replica.options(stream=True)
        result["handle_stream"] = p50_ms(
            lambda: list(streaming.generate.remote(request(RequestOutputKind.DELTA))), args.n
        )
        if hasattr(EngineReplica, "generate_final"):
            final = lambda: replica.generate_final.remote(  # noqa: E731
                request(RequestOutputKind.FINAL_ONLY)
            ).result(timeout_s=30)
            result["handle_final"] = p50_ms(final, args.n)
        serve.delete("pagoda")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
