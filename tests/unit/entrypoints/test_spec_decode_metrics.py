"""Speculative decoding's counters under vLLM's names, and its line in the periodic log."""

from __future__ import annotations

import logging

import pytest
from fake_engine import FakeEngineClient
from prometheus_client import generate_latest

from pagoda.engine.messages import EngineOutput, EngineOutputs, SchedulerStats, SpecDecodeStats
from pagoda.entrypoints import metrics as metrics_module
from pagoda.entrypoints.metrics import Metrics
from pagoda.tokenizer import Tokenizer


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngineClient:
    """An engine configured with speculative decoding."""
    return FakeEngineClient(tokenizer, speculative=True)


def value(text: str, name: str, labels: str = 'model_name="fake-model"') -> float:
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"{prefix} is not in the metrics")


def stats(drafts: int, drafted: int, accepted: int, per_pos: list[int]) -> SchedulerStats:
    spec = SpecDecodeStats(drafts, drafted, accepted, per_pos)
    return SchedulerStats(num_running=1, spec_decode=spec)


def test_counters_advance_by_the_engine_totals(engine) -> None:
    metrics = Metrics(engine.config)
    metrics.step(EngineOutputs([], stats=stats(2, 8, 5, [2, 1, 1, 1])), [])
    metrics.step(EngineOutputs([], stats=stats(3, 12, 6, [3, 1, 1, 1])), [])
    text = generate_latest(metrics.registry).decode()
    assert value(text, "vllm:spec_decode_num_drafts_total") == 3
    assert value(text, "vllm:spec_decode_num_draft_tokens_total") == 12
    assert value(text, "vllm:spec_decode_num_accepted_tokens_total") == 6
    per_pos = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
    for pos, expected in enumerate([3, 1, 1, 1]):
        labels = f'model_name="fake-model",position="{pos}"'
        assert value(text, per_pos, labels) == expected


def test_the_periodic_line_gives_the_acceptance_rate(engine, caplog, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    metrics = Metrics(engine.config)
    metrics.step(EngineOutputs([], stats=stats(1, 4, 4, [1, 1, 1, 1])), [])
    clock[0] += 11
    with caplog.at_level(logging.INFO, logger="pagoda.entrypoints.metrics"):
        metrics.step(EngineOutputs([], stats=stats(1, 4, 4, [1, 1, 1, 1])), [])
    assert caplog.text == ""  # nothing generated: no line, a new window
    clock[0] += 11
    out = EngineOutput("r", [5, 6, 7])
    with caplog.at_level(logging.INFO, logger="pagoda.entrypoints.metrics"):
        # In this window: 4 drafts of 16 tokens, 8 accepted.
        metrics.step(EngineOutputs([out], stats=stats(5, 20, 12, [5, 3, 2, 2])), [])
    assert "draft acceptance rate 50.0%" in caplog.text
    assert "mean acceptance length 3.00" in caplog.text


def test_without_speculation_its_metrics_are_not_exported(tokenizer: Tokenizer) -> None:
    """As vLLM: the spec-decode names exist only when speculation is configured, so a
    dashboard can tell "off" from "on, nothing accepted"."""
    metrics = Metrics(FakeEngineClient(tokenizer).config)
    metrics.step(EngineOutputs([], stats=SchedulerStats(num_running=1)), [])
    text = generate_latest(metrics.registry).decode()
    assert "vllm:num_requests_running" in text
    assert "spec_decode" not in text
    on = generate_latest(Metrics(FakeEngineClient(tokenizer, speculative=True).config).registry)
    assert 'vllm:spec_decode_num_drafts_total{model_name="fake-model"} 0.0' in on.decode()
