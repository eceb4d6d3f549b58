"""Each replica's vLLM-named metrics on the ingress's /metrics, with a `replica` label.

Serve gives the ingress no way to reach every replica, so each replica sends its own
Prometheus text to the ingress every few seconds (EngineReplica.push_metrics), and the
ingress answers /metrics with all of them merged: one family per name, each sample with
the replica's id added, so a vLLM dashboard works and can also split by replica. The same
report says whether the replica's engine is alive: the ingress's /health is 200 while one is.
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
    """The latest report of each replica (its metrics text, and whether its engine is
    healthy); a replica silent for `stale_after` seconds (stopped, or replaced) is dropped."""

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.latest: dict[str, tuple[float, str, bool]] = {}  # replica id -> (when, text, healthy)

    def record(self, replica: str, text: str, healthy: bool = True, age: float = 0.0) -> None:
        """A report made age seconds ago (one relayed by ReplicaReports: see reports())."""
        self.latest[replica] = (time.monotonic() - age, text, healthy)

    def reports(self) -> list[tuple[str, str, bool, float]]:
        """The fresh reports as (replica, text, healthy, age in seconds), for another
        ReplicaMetrics to record: ages, not times, cross machines whose clocks differ."""
        now = time.monotonic()
        return [(r, text, ok, now - when) for r, (when, text, ok) in self._fresh().items()]

    def any_healthy(self) -> bool:
        """Whether a replica heard from lately has a live engine. True before any replica
        has reported: Serve starts the ingress once its replicas are ready."""
        if not self.latest:
            return True
        return any(healthy for _, _, healthy in self._fresh().values())

    def _fresh(self) -> dict[str, tuple[float, str, bool]]:
        now = time.monotonic()
        return {
            r: report for r, report in self.latest.items() if now - report[0] <= self.stale_after
        }

    def collect(self) -> Iterable[Metric]:
        """The replicas' families merged, each sample labelled with its replica."""
        families: dict[str, Metric] = {}
        for replica, (_, text, _) in sorted(self._fresh().items()):
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
