"""Each replica's vLLM-named metrics on the ingress's /metrics, with a `replica` label.

Serve gives the ingress no way to reach every replica, so each replica sends its own
Prometheus text to the ingress every few seconds (EngineReplica.push_metrics), and the
ingress answers /metrics with all of them merged: one family per name, each sample with
the replica's id added, so a vLLM dashboard works and can also split by replica.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


class ReplicaMetrics:
    """The latest metrics text of each replica; a replica silent for `stale_after` seconds
    (stopped, or replaced) is dropped."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.latest: dict[str, tuple[float, str]] = {}  # replica id -> (when, text)

    def record(self, replica: str, text: str) -> None:
        self.latest[replica] = (time.monotonic(), text)

    def collect(self) -> Iterable[Metric]:
        """The replicas' families merged, each sample labelled with its replica."""
        now = time.monotonic()
        families: dict[str, Metric] = {}
        for replica, (when, text) in sorted(self.latest.items()):
            if now - when > self.stale_after:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for s in family.samples:
                    labels = {**s.labels, "replica": replica}
                    merged.samples.append(Sample(s.name, labels, s.value, s.timestamp))
        return families.values()

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)  # type: ignore[arg-type]
        return generate_latest(registry)


class ReplicaMetricsMiddleware:
    """GET /metrics answers with the replicas' metrics (the ingress runs no engine)."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics" and scope["method"] == "GET":
            response = Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
