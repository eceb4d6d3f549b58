"""The ingress's /metrics: every replica's vLLM-named series, each with its replica label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.deploy.replica_metrics import ReplicaMetrics


def replica_text(hits: float, running: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("vllm:prefix_cache_hits", "Hits.", ["model_name"], registry=registry)
    counter.labels(model_name="m").inc(hits)
    gauge = Gauge("vllm:num_requests_running", "Running.", ["model_name"], registry=registry)
    gauge.labels(model_name="m").set(running)
    return generate_latest(registry).decode()


def samples(metrics: ReplicaMetrics) -> dict[tuple[str, str], float]:
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[s.name, s.labels["replica"]] = s.value
    return out


def test_replicas_are_merged_under_one_family_each_with_a_replica_label() -> None:
    metrics = ReplicaMetrics(stale_after=60)
    metrics.record("a", replica_text(hits=5, running=1))
    metrics.record("b", replica_text(hits=7, running=0))
    text = metrics.exposition().decode()
    assert text.count("# TYPE vllm:prefix_cache_hits_total counter") == 1
    assert samples(metrics) == {
        ("vllm:prefix_cache_hits_total", "a"): 5,
        ("vllm:prefix_cache_hits_total", "b"): 7,
        ("vllm:num_requests_running", "a"): 1,
        ("vllm:num_requests_running", "b"): 0,
    }
    assert 'model_name="m"' in text


def test_a_replica_that_stopped_sending_is_dropped() -> None:
    metrics = ReplicaMetrics(stale_after=0.0)
    metrics.record("gone", replica_text(hits=1, running=0))
    assert samples(metrics) == {}


def test_healthy_while_any_replica_heard_from_lately_has_a_live_engine() -> None:
    metrics = ReplicaMetrics(stale_after=60)
    assert metrics.any_healthy()  # nothing heard yet: Serve started the replicas ready
    metrics.record("a", replica_text(hits=0, running=0), healthy=True)
    metrics.record("b", replica_text(hits=0, running=0), healthy=False)
    assert metrics.any_healthy()
    metrics.record("a", replica_text(hits=0, running=0), healthy=False)
    assert not metrics.any_healthy()
    metrics.record("c", replica_text(hits=0, running=0), healthy=True)  # a replacement
    assert metrics.any_healthy()


def test_no_replica_heard_from_lately_is_not_healthy() -> None:
    metrics = ReplicaMetrics(stale_after=0.0)
    metrics.record("gone", replica_text(hits=0, running=0), healthy=True)
    assert not metrics.any_healthy()
