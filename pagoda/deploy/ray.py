"""Pagoda on Ray Serve: replicas that each own an engine, behind Pagoda's own OpenAI app.

    client -> Serve HTTP proxy -> PagodaIngress: build_app() around a ReplicaEngineClient
                                  (the routes, auth, CORS, errors and SSE of `pagoda serve`;
                                  tokenizing and validation happen here)
           -> DeploymentHandle, streaming, routed by Ray's PrefixCacheAffinityRouter
           -> EngineReplica x N: one AsyncEngineClient and its engine process each

Ray does the cluster work: placing replicas, health checks (a replica whose engine died
fails its check and is replaced), autoscaling on ongoing requests, and draining on shutdown.
`pagoda_app()` returns the Serve application for users who compose their own; `pagoda
serve-ray` (serve_ray below) runs it on a local cluster or the one at --ray-address.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from ray import __version__ as ray_version
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import RequestRouter

from pagoda.config import ConfigError, EngineConfig, ServerConfig
from pagoda.deploy.config import RayDeployConfig, deploy_config_of
from pagoda.deploy.replica_client import (
    ReplicaEngineClient,
    ReplicaRefused,
    ReplicaRequest,
    ServedBy,
    ServedByMiddleware,
)
from pagoda.deploy.replica_metrics import ReplicaMetrics, ReplicaMetricsMiddleware
from pagoda.engine.protocol import ServingConfig, TokensPrompt
from pagoda.entrypoints.openai.api_server import PagodaApp, build_app
from pagoda.outputs import RequestOutput
from pagoda.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Where Ray keeps its prefix-affinity router, most stable first. Its public home (a stable
# API since Ray 2.49) is ray.serve.llm.request_router, but that package imports all of
# ray.serve.llm first, which needs Ray's LLM extra (pyarrow and more) that `ray[serve]`
# lacks; the class itself needs none of it and is defined in Ray's internal module, the
# same class the public name subclasses.
PREFIX_AFFINITY_ROUTERS = (
    "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
    "PrefixCacheAffinityRouter",
)


def prefix_affinity_router() -> type[RequestRouter]:
    """Ray's PrefixCacheAffinityRouter from the first of PREFIX_AFFINITY_ROUTERS that imports.

    Raises ConfigError, naming --no-prefix-affinity, when this Ray has it at neither path.
    """
    failures = []
    for path in PREFIX_AFFINITY_ROUTERS:
        module, _, name = path.rpartition(".")
        try:
            router = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            failures.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if isinstance(router, type) and issubclass(router, RequestRouter):
            return router
        failures.append(f"{path}: not a Ray Serve RequestRouter")
    raise ConfigError(
        f"prefix-affinity routing needs Ray Serve's PrefixCacheAffinityRouter, which Ray "
        f"{ray_version} does not have where Pagoda looks ({'; '.join(failures)}); install "
        "ray[serve]==2.60.0, or pass --no-prefix-affinity to route by load alone"
    )


class EngineReplica:
    """One Serve replica: one engine (an AsyncEngineClient with its engine process)."""

    # Ray Serve awaits an async constructor: the replica is ready once its engine is.
    async def __init__(  # type: ignore[misc]
        self, engine_config: EngineConfig, watchdog_timeout: float | None, metrics_period_s: float
    ) -> None:
        from pagoda.engine.async_client import AsyncEngineClient
        from pagoda.entrypoints.metrics import Metrics

        self.engine = AsyncEngineClient(
            engine_config,
            served_model_names=engine_config.model.served_model_names,
            watchdog_timeout=watchdog_timeout,
        )
        await self.engine.ready()
        self.metrics = Metrics(self.engine.config)
        self.engine.add_stat_logger(self.metrics)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self._pusher = asyncio.create_task(self.push_metrics(context.app_name, metrics_period_s))

    async def push_metrics(self, app_name: str, period_s: float) -> None:
        """Sends this replica's metrics text and engine health to the ingress every period_s
        seconds, the first time at once."""
        record = serve.get_deployment_handle("PagodaIngress", app_name).record_metrics
        while True:
            text = generate_latest(self.metrics.registry).decode()
            try:
                await record.remote(self.replica, text, not self.engine.errored)
            except Exception as e:  # the ingress restarting: the next push will do
                logger.debug("metrics push failed: %s", e)
            await asyncio.sleep(period_s)

    def serving_config(self) -> ServingConfig:
        return self.engine.config

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[ServedBy | RequestOutput]:
        """ServedBy, then the request's outputs; a cancel from the ingress aborts it here."""
        self._refuse_if_dead()
        yield ServedBy(self.replica)
        async for output in self._generate(request):
            yield output

    async def generate_final(self, request: ReplicaRequest) -> tuple[ServedBy, RequestOutput]:
        """A non-streamed request (FINAL_ONLY: one output) as one Ray call, not a stream:
        each stream item is a message of its own between the processes."""
        self._refuse_if_dead()
        final = None
        async for output in self._generate(request):
            final = output
        assert final is not None, "a request ends with an output"
        return ServedBy(self.replica), final

    def _refuse_if_dead(self) -> None:
        if self.engine.errored:
            raise ReplicaRefused(f"replica {self.replica}: {self.engine.dead_error}")

    def _generate(self, request: ReplicaRequest) -> AsyncIterator[RequestOutput]:
        prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        if request.text is not None:
            prompt["prompt"] = request.text
        return self.engine.generate(prompt, request.sampling_params, request.request_id)

    async def check_health(self) -> None:
        """Ray's periodic check: a dead engine makes the replica unhealthy, and replaced."""
        await self.engine.check_health()

    def engine_info(self) -> tuple[str, int | None]:
        """(this replica's id, its engine process's pid): for operators and tests."""
        return self.replica, self.engine.process.pid

    def __del__(self) -> None:
        # Serve calls this after draining the replica's requests (graceful_shutdown_timeout_s).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(0.0)


@serve.ingress()
class PagodaIngress:
    """Pagoda's FastAPI app, built (late, on the replica) around the engine replicas."""

    def __init__(
        self, engines: DeploymentHandle, server_config: ServerConfig, metrics_period_s: float
    ) -> None:
        self.engines = engines
        self.server_config = server_config
        self.client: ReplicaEngineClient | None = None
        self.replica_metrics = ReplicaMetrics(stale_after=3 * metrics_period_s)
        self.pagoda_app: PagodaApp | None = None

    async def __serve_build_asgi_app__(self) -> PagodaApp:
        config: ServingConfig = await self.engines.serving_config.remote()
        tokenizer = await asyncio.to_thread(Tokenizer.from_path, Path(config.model_path))
        health = self.replica_metrics.any_healthy
        self.client = ReplicaEngineClient(self.engines, tokenizer, config, health=health)
        app = build_app(self.client, self.server_config)
        app.add_middleware(ServedByMiddleware)
        app.add_middleware(ReplicaMetricsMiddleware, metrics=self.replica_metrics)
        self.pagoda_app = app
        return app

    async def drain(self, timeout: float) -> None:
        """Refuses new requests (503, as a draining `pagoda serve` does) and waits up to
        timeout seconds for those in flight to finish. Serve's own shutdown does not wait
        for the HTTP proxy's open streams, so serve_ray calls this first."""
        if self.pagoda_app is None:
            return
        state = self.pagoda_app.server_state
        state.draining = True
        deadline = time.monotonic() + timeout
        while state.server_load > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def record_metrics(self, replica: str, text: str, healthy: bool) -> None:
        """A replica's latest metrics and health (sent by each replica every few seconds)."""
        self.replica_metrics.record(replica, text, healthy)

    def __del__(self) -> None:
        if self.client is not None:
            self.client.shutdown()


def pagoda_app(
    engine_config: EngineConfig,
    server_config: ServerConfig | None = None,
    deploy: RayDeployConfig | None = None,
) -> Any:
    """The Serve application (a bound ingress over the engine replicas), for serve.run()."""
    server_config = server_config or ServerConfig()
    deploy = deploy or RayDeployConfig()
    options: dict[str, Any] = {
        "max_ongoing_requests": deploy.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": deploy.cpus_per_replica()},
        "health_check_period_s": deploy.health_check_period_s,
        "graceful_shutdown_timeout_s": deploy.shutdown_timeout,
    }
    if deploy.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": deploy.min_replicas or 1,
            "max_replicas": deploy.most_replicas,
            "target_ongoing_requests": deploy.target_ongoing_requests,
            "upscale_delay_s": deploy.upscale_delay_s,
            "downscale_delay_s": deploy.downscale_delay_s,
        }
    else:
        options["num_replicas"] = deploy.num_replicas
    if deploy.prefix_affinity:
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=prefix_affinity_router(),  # type: ignore[arg-type]
            request_router_kwargs={"imbalanced_threshold": deploy.imbalanced_threshold},
        )
    engines = serve.deployment(**options)(EngineReplica)
    ingress = serve.deployment(
        max_ongoing_requests=100_000,  # the replicas' limits are the ones that count
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=deploy.shutdown_timeout,
    )(PagodaIngress)
    watchdog_timeout = server_config.watchdog_timeout or None
    period = deploy.metrics_period_s
    replicas = engines.bind(engine_config, watchdog_timeout, period)
    return ingress.bind(replicas, server_config, period)


# ---- `pagoda serve-ray` ------------------------------------------------------------------


def serve_ray(
    args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig
) -> int:
    """Runs the application until SIGINT/SIGTERM, then drains and stops it and Ray."""
    import ray

    app = pagoda_app(engine_config, server_config, deploy_config_of(args))  # before Ray starts
    ray.init(address=args.ray_address, include_dashboard=False)
    # After ray.init, whose own SIGTERM handler would end the process without draining.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host or "0.0.0.0", "port": args.port})
        serve.run(app, name="pagoda")
        logger.info("serving on http://%s:%d", args.host or "0.0.0.0", args.port)
        while not stop.wait(1.0):
            pass
        logger.info("draining for up to %.0f s", args.shutdown_timeout)
        ingress = serve.get_app_handle("pagoda")
        ingress.drain.remote(args.shutdown_timeout).result(timeout_s=args.shutdown_timeout + 30)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
