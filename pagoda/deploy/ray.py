"""Pagoda on Ray Serve: replicas that each own an engine, behind Pagoda's own OpenAI app.

    `pagoda serve-ray`:
    client -> uvicorn in the serve-ray process (Pagoda's launcher: TLS, limits, drain)
              build_app() around a ReplicaEngineClient (tokenizing and validation here)
           -> DeploymentHandle, routed by PrefixAffinityRouter (prefix_router.py)
           -> EngineReplica x N: one engine each, on a thread of the replica's process

    pagoda_app(), for users who compose Serve applications:
    client -> Serve HTTP proxy -> PagodaIngress (the same app, in a Serve replica) -> ...

Ray does the cluster work: placing replicas, health checks (a replica whose engine died
fails its check and is replaced), autoscaling on ongoing requests, and draining on shutdown.
`pagoda serve-ray` runs no Serve proxy: a request takes one Ray call (ingress -> replica)
instead of two (proxy -> ingress actor -> replica).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import socket
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
from pagoda.entrypoints.launcher import bind_socket, bind_unix_socket, serve_http
from pagoda.entrypoints.openai.api_server import PagodaApp, build_app
from pagoda.outputs import RequestOutput
from pagoda.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Pagoda's prefix-affinity router (Ray's PrefixCacheAffinityRouter with its prefix tree in
# the routing process, not in an actor asked per request: pagoda/deploy/prefix_router.py). It
# builds on Ray internals (the PrefixTree class, the power-of-two-choices router) that
# another Ray may lack or move.
PREFIX_AFFINITY_ROUTERS = ("pagoda.deploy.prefix_router.PrefixAffinityRouter",)


def prefix_affinity_router() -> type[RequestRouter]:
    """The first of PREFIX_AFFINITY_ROUTERS that imports.

    Raises ConfigError, naming --no-prefix-affinity, when none does with this Ray.
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
        f"prefix-affinity routing needs Ray Serve's request-router API and Ray's PrefixTree, "
        f"which Ray {ray_version} does not have where Pagoda looks ({'; '.join(failures)}); "
        "install ray[serve]==2.60.0, or pass --no-prefix-affinity to route by load alone"
    )


class EngineReplica:
    """One Serve replica: one engine, its core on a thread of the replica's own process.

    No engine process of its own (as `pagoda serve` has): Ray watches the replica's process,
    and the engine's outputs reach the replica's event loop without a ZMQ hop. An engine
    that raises or hangs fails the replica's health check, and Ray replaces the replica; an
    engine that dies with the process is a dead actor to Ray, replaced the same way.
    """

    # Ray Serve awaits an async constructor: the replica is ready once its engine is.
    async def __init__(  # type: ignore[misc]
        self,
        engine_config: EngineConfig,
        watchdog_timeout: float | None,
        metrics_period_s: float,
        reports_to: str = "PagodaIngress",
    ) -> None:
        """reports_to: the deployment of this application that keeps the metrics reports."""
        from pagoda.engine.inproc_client import InProcessEngineClient
        from pagoda.entrypoints.metrics import Metrics

        self.engine = InProcessEngineClient(
            engine_config,
            served_model_names=engine_config.model.served_model_names,
            watchdog_timeout=watchdog_timeout,
        )
        await self.engine.ready()
        self.metrics = Metrics(self.engine.config)
        self.engine.add_stat_logger(self.metrics)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        reports = serve.get_deployment_handle(reports_to, context.app_name)
        self._pusher = asyncio.create_task(self.push_metrics(reports, metrics_period_s))

    async def push_metrics(self, reports: DeploymentHandle, period_s: float) -> None:
        """Sends this replica's metrics text and engine health to reports every period_s
        seconds, the first time at once."""
        record = reports.record_metrics
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

    def engine_info(self) -> tuple[str, int]:
        """(this replica's id, the pid of its process, where its engine runs): for operators
        and tests."""
        return self.replica, os.getpid()

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
        self.client, self.pagoda_app = await ingress_app(
            self.engines, self.server_config, self.replica_metrics
        )
        return self.pagoda_app

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


async def ingress_app(
    engines: DeploymentHandle, server_config: ServerConfig, metrics: ReplicaMetrics
) -> tuple[ReplicaEngineClient, PagodaApp]:
    """Pagoda's FastAPI app over the engine replicas; /metrics and /health answer from the
    replicas' reports, kept in metrics."""
    config: ServingConfig = await engines.serving_config.remote()
    tokenizer = await asyncio.to_thread(Tokenizer.from_path, Path(config.model_path))
    client = ReplicaEngineClient(engines, tokenizer, config, health=metrics.any_healthy)
    app = build_app(client, server_config)
    app.add_middleware(ServedByMiddleware)
    app.add_middleware(ReplicaMetricsMiddleware, metrics=metrics)
    return client, app


class ReplicaReports:
    """The replicas' metrics reports, where `pagoda serve-ray`'s own HTTP server reads them
    (a replica can call a deployment, not a process outside Serve)."""

    def __init__(self, engines: DeploymentHandle, metrics_period_s: float) -> None:
        self.engines = engines  # bound here so that the application deploys the replicas
        self.metrics = ReplicaMetrics(stale_after=3 * metrics_period_s)

    def record_metrics(self, replica: str, text: str, healthy: bool) -> None:
        self.metrics.record(replica, text, healthy)

    def reports(self) -> list[tuple[str, str, bool, float]]:
        return self.metrics.reports()


def engine_deployment(deploy: RayDeployConfig) -> Any:
    """EngineReplica as a Serve deployment: how many, how they scale, routing, health, drain."""
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
    return serve.deployment(**options)(EngineReplica)


def pagoda_app(
    engine_config: EngineConfig,
    server_config: ServerConfig | None = None,
    deploy: RayDeployConfig | None = None,
) -> Any:
    """The Serve application for serve.run(), for users who compose Serve applications:
    PagodaIngress (behind Serve's HTTP proxy) over the engine replicas."""
    server_config = server_config or ServerConfig()
    deploy = deploy or RayDeployConfig()
    ingress = serve.deployment(
        max_ongoing_requests=100_000,  # the replicas' limits are the ones that count
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=deploy.shutdown_timeout,
    )(PagodaIngress)
    watchdog_timeout = server_config.watchdog_timeout or None
    period = deploy.metrics_period_s
    replicas = engine_deployment(deploy).bind(engine_config, watchdog_timeout, period)
    return ingress.bind(replicas, server_config, period)


def replicas_app(
    engine_config: EngineConfig, server_config: ServerConfig, deploy: RayDeployConfig
) -> Any:
    """`pagoda serve-ray`'s Serve application: the engine replicas, and ReplicaReports to keep
    their metrics reports. No HTTP ingress: serve_ray's own server calls the replicas."""
    watchdog_timeout = server_config.watchdog_timeout or None
    period = deploy.metrics_period_s
    replicas = engine_deployment(deploy).bind(
        engine_config, watchdog_timeout, period, "ReplicaReports"
    )
    reports = serve.deployment(ray_actor_options={"num_cpus": 0})(ReplicaReports)
    return reports.bind(replicas, period)


# ---- `pagoda serve-ray` ------------------------------------------------------------------

APP_NAME = "pagoda"
QUIET_REPLICAS = {"enable_access_log": False}


def serve_ray(
    args: argparse.Namespace,
    engine_config: EngineConfig,
    server_config: ServerConfig,
    launcher_options: dict[str, Any],
) -> int:
    """Deploys the replicas on Ray (Serve's proxy off), then serves Pagoda's app from this
    process with `pagoda serve`'s launcher until SIGINT/SIGTERM; drains, stops Serve and Ray.

    launcher_options: serve_http's keyword arguments, as `pagoda serve` gives them (TLS and
    its reload, the drain's timeout, uvicorn's log flags).
    """
    import ray

    deploy = deploy_config_of(args)
    app = replicas_app(engine_config, server_config, deploy)  # before Ray starts
    # Bound before Ray and the engines start: a taken port fails fast.
    sock = bind_unix_socket(args.uds) if args.uds else bind_socket(args.host, args.port)
    ray.init(address=args.ray_address, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")
        # Serve's access log would write a line per request in each replica, and Ray would
        # ship each to this process's log: this server's uvicorn access log covers requests.
        serve.run(app, name=APP_NAME, route_prefix=None, logging_config=QUIET_REPLICAS)
        return asyncio.run(
            _serve_http(server_config, deploy.metrics_period_s, sock, launcher_options)
        )
    finally:
        serve.shutdown()
        ray.shutdown()


async def _serve_http(
    server_config: ServerConfig,
    metrics_period_s: float,
    sock: socket.socket,
    launcher_options: dict[str, Any],
) -> int:
    engines = serve.get_deployment_handle("EngineReplica", APP_NAME)
    metrics = ReplicaMetrics(stale_after=3 * metrics_period_s)
    _, app = await ingress_app(engines, server_config, metrics)
    relay = asyncio.create_task(
        relay_reports(serve.get_app_handle(APP_NAME), metrics, metrics_period_s)
    )
    try:
        return await serve_http(app, sock, **launcher_options)
    finally:
        relay.cancel()


async def relay_reports(
    reports: DeploymentHandle, metrics: ReplicaMetrics, period_s: float
) -> None:
    """Copies ReplicaReports' reports into metrics every period_s seconds."""
    while True:
        try:
            for replica, text, healthy, age in await reports.reports.remote():
                metrics.record(replica, text, healthy, age)
        except Exception as e:  # Serve replacing ReplicaReports: the next relay will do
            logger.debug("reading the replicas' reports failed: %s", e)
        await asyncio.sleep(period_s)
