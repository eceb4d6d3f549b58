"""Prometheus metrics under vLLM's names, so that existing dashboards and routers work."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagoda.core.request import FinishReason
from pagoda.engine.messages import EngineOutputs, EngineRequest, SchedulerStats, SpecDecodeStats
from pagoda.engine.protocol import ServingConfig
from pagoda.outputs import RequestOutput

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


_TOKEN_BUCKETS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
)  # fmt: skip


logger = logging.getLogger(__name__)

# Seconds between the engine's summary lines in the log (vLLM's LoggingStatLogger: 10 s).
LOG_INTERVAL = 10.0

_N_BUCKETS = (1, 2, 5, 10, 20)
_PREEMPTION_BUCKETS = (0, 1, 2, 3, 4, 5, 10, 20)


@dataclass
class _Live:
    parent: str  # the id of the request its client sent (its own, unless it is one of n)
    arrival: float
    num_prompt_tokens: int
    max_tokens: int | None
    scheduled: float | None = None  # when the engine first scheduled it
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0


class Metrics:
    """Fed by the engine client's listeners; exposed on /metrics."""

    def __init__(self, config: ServingConfig) -> None:
        model_name = config.served_model_names[0]
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        # A metric labelled by the model only has its series from the start, at 0, as vLLM's:
        # a router or dashboard reading a server that has not served yet finds every name.
        def gauge(name: str, doc: str) -> Gauge:
            metric = Gauge(name, doc, labels, registry=r)
            metric.labels(model_name)
            return metric

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            metric = Counter(name, doc, labels + list(extra), registry=r)
            if not extra:
                metric.labels(model_name)
            return metric

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS
        ) -> Histogram:
            metric = Histogram(name, doc, labels, buckets=buckets, registry=r)
            metric.labels(model_name)
            return metric

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        # vLLM's "deferred" are waiting requests skipped for a reason other than room (a
        # grammar still compiling, remote KV not yet arrived); Pagoda's scheduler skips none:
        # every waiting request waits for blocks, the token budget or a batch slot.
        self.waiting_by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Requests waiting, by why: capacity (room in the batch or KV cache) or deferred.",
            labels + ["reason"],
            registry=r,
        )
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found cached.")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions of running requests.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens received.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.success = counter(
            "vllm:request_success", "Requests finished.", extra=("finished_reason",)
        )
        for reason in FinishReason:  # every reason's series from the start, at 0, as vLLM's
            self.success.labels(model_name, reason.value)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between tokens.")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency.")
        self.queue = histogram("vllm:request_queue_time_seconds", "Time waiting for the batch.")
        # Per finished engine request (each of a request's n samples is one), as vLLM's.
        self.request_prompt = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of a request.", _TOKEN_BUCKETS
        )
        self.request_generation = histogram(
            "vllm:request_generation_tokens", "Tokens generated for a request.", _TOKEN_BUCKETS
        )
        self.params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "The max_tokens parameter.", _TOKEN_BUCKETS
        )
        self.inference = histogram(
            "vllm:request_inference_time_seconds", "From first scheduled to finished."
        )
        self.prefill = histogram(
            "vllm:request_prefill_time_seconds", "From first scheduled to the first token."
        )
        self.decode = histogram("vllm:request_decode_time_seconds", "From first to last token.")
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds", "A request's mean time between tokens."
        )
        self.params_n = histogram(
            "vllm:request_params_n", "The n parameter of a request.", _N_BUCKETS
        )
        self.request_preemptions = histogram(
            "vllm:request_num_preemptions",
            "Times a finished request was preempted.",
            _PREEMPTION_BUCKETS,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Tokens computed in an engine step.", _TOKEN_BUCKETS
        )
        # Speculative decoding, as vLLM's: drafts verified, their tokens, how many were
        # accepted, and how many at each draft position (acceptance falls along a draft).
        # Registered only when speculation is configured, as vLLM does.
        self.spec: _SpecCounters | None = None
        if config.speculative:
            self.spec = _SpecCounters(
                drafts=counter("vllm:spec_decode_num_drafts", "Drafts verified."),
                draft_tokens=counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified."),
                accepted_tokens=counter(
                    "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted."
                ),
                accepted_per_pos=counter(
                    "vllm:spec_decode_num_accepted_tokens_per_pos",
                    "Draft tokens accepted, by position in the draft.",
                    extra=("position",),
                ),
            )
        # An info gauge, as vLLM's: the value is 1, the configuration is in the labels.
        cache_info = {
            "block_size": str(config.block_size),
            "cache_dtype": config.cache_dtype,  # --kv-cache-dtype as given, as vLLM's
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "num_gpu_blocks": str(config.num_gpu_blocks),
        }
        Gauge(
            "vllm:cache_config_info",
            "Information of the KV cache configuration.",
            list(cache_info),
            registry=r,
        ).labels(**cache_info).set(1)
        self.model_name = model_name
        self._live: dict[str, _Live] = {}
        self._num_samples: dict[str, int] = {}  # by client request id, until it finishes
        self._aborted_parents: set[str] = set()  # forgotten after the next step
        self._last = SchedulerStats()
        self._log = _LogWindow(time.monotonic())

    @property
    def latest_stats(self) -> SchedulerStats:
        """The engine's scheduler stats as of its last step."""
        return self._last

    def request_added(self, request: EngineRequest) -> None:
        params = request.sampling_params
        parent = request.parent_id or request.request_id
        self._num_samples[parent] = self._num_samples.get(parent, 0) + 1
        self._live[request.request_id] = _Live(
            parent=parent,
            arrival=time.time(),
            num_prompt_tokens=len(request.prompt_token_ids),
            max_tokens=params.max_tokens,
        )
        self.prompt_tokens.labels(self.model_name).inc(len(request.prompt_token_ids))

    def request_aborted(self, engine_ids: list[str]) -> None:
        for engine_id in engine_ids:
            live = self._live.pop(engine_id, None)
            if live is not None:
                # A stop string ends a request with an abort before the step that finishes it.
                self._aborted_parents.add(live.parent)

    def step(self, step: EngineOutputs, outputs: list[RequestOutput]) -> None:
        now = time.time()
        m = self.model_name
        if step.stats is not None:
            self._record_stats(step.stats)
        for eo in step.outputs:
            self._log.generated += len(eo.new_token_ids)
            live = self._live.get(eo.request_id)
            if live is None:
                continue
            if eo.new_token_ids:
                self.generation_tokens.labels(m).inc(len(eo.new_token_ids))
                live.num_generated += len(eo.new_token_ids)
                if live.last_token is None:
                    self.ttft.labels(m).observe(now - live.arrival)
                    queued = eo.queue_time or 0.0
                    if eo.queue_time is not None:
                        self.queue.labels(m).observe(eo.queue_time)
                    live.scheduled = live.arrival + queued
                    live.first_token = now
                else:
                    self.itl.labels(m).observe(now - live.last_token)
                live.last_token = now
            if eo.finish_reason is not None:
                self._live.pop(eo.request_id, None)
                self._request_finished(live, now)
                self.request_preemptions.labels(m).observe(eo.num_preemptions)
        for output in outputs:
            if output.finished:
                reason = output.outputs[0].finish_reason or "stop"
                self.success.labels(m, reason).inc()
                self.e2e.labels(m).observe(now - output.metrics["arrival_time"])
                n = self._num_samples.pop(output.request_id, None)
                if n is not None:  # the client's request, once: not each of its n samples
                    self.params_n.labels(m).observe(n)
        if self._aborted_parents:  # those the step did not finish were aborted by their client
            live_parents = {live.parent for live in self._live.values()}
            for parent in self._aborted_parents - live_parents:
                self._num_samples.pop(parent, None)
            self._aborted_parents.clear()
        self._maybe_log(time.monotonic())

    def _maybe_log(self, now: float) -> None:
        """Every LOG_INTERVAL seconds with output: a summary line, as vLLM's engine logs."""
        window = self._log
        elapsed = now - window.start
        if elapsed < LOG_INTERVAL:
            return
        stats = self._last
        if window.generated:
            line = (
                f"Avg generation throughput: {window.generated / elapsed:.1f} tokens/s, "
                f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%"
            )
            spec, before = stats.spec_decode, window.spec
            if spec is not None and before is not None:
                drafts = spec.num_drafts - before.num_drafts
                drafted = spec.num_draft_tokens - before.num_draft_tokens
                accepted = spec.num_accepted_tokens - before.num_accepted_tokens
                if drafts:
                    line += (
                        f", Spec decode: draft acceptance rate {100 * accepted / drafted:.1f}%, "
                        f"mean acceptance length {1 + accepted / drafts:.2f}, "
                        f"drafted {drafted} tokens, accepted {accepted}"
                    )
            logger.info("%s", line)
        self._log = _LogWindow(now, spec=stats.spec_decode)

    def _request_finished(self, live: _Live, now: float) -> None:
        m = self.model_name
        self.request_prompt.labels(m).observe(live.num_prompt_tokens)
        self.request_generation.labels(m).observe(live.num_generated)
        if live.max_tokens is not None:
            self.params_max_tokens.labels(m).observe(live.max_tokens)
        if live.scheduled is None or live.first_token is None:
            return  # finished (aborted, or stopped) before its first token
        self.inference.labels(m).observe(now - live.scheduled)
        self.prefill.labels(m).observe(live.first_token - live.scheduled)
        self.decode.labels(m).observe(now - live.first_token)
        if live.num_generated > 1:
            self.tpot.labels(m).observe((now - live.first_token) / (live.num_generated - 1))

    def _record_stats(self, stats: SchedulerStats) -> None:
        m, last = self.model_name, self._last
        if stats.step_num_tokens:
            self.iteration_tokens.labels(m).observe(stats.step_num_tokens)
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.waiting_by_reason.labels(m, "capacity").set(stats.num_waiting)
        self.waiting_by_reason.labels(m, "deferred").set(0)
        self.kv_usage.labels(m).set(stats.kv_cache_usage)
        # The engine reports running totals; counters advance by the difference.
        self.prefix_queries.labels(m).inc(stats.prefix_cache_queries - last.prefix_cache_queries)
        self.prefix_hits.labels(m).inc(stats.prefix_cache_hits - last.prefix_cache_hits)
        self.preemptions.labels(m).inc(stats.num_preemptions - last.num_preemptions)
        spec, counters = stats.spec_decode, self.spec
        if spec is not None and counters is not None:
            before = last.spec_decode or SpecDecodeStats(
                num_accepted_tokens_per_pos=[0] * len(spec.num_accepted_tokens_per_pos)
            )
            counters.drafts.labels(m).inc(spec.num_drafts - before.num_drafts)
            counters.draft_tokens.labels(m).inc(spec.num_draft_tokens - before.num_draft_tokens)
            counters.accepted_tokens.labels(m).inc(
                spec.num_accepted_tokens - before.num_accepted_tokens
            )
            for pos, (now_, then) in enumerate(
                zip(spec.num_accepted_tokens_per_pos, before.num_accepted_tokens_per_pos)
            ):
                counters.accepted_per_pos.labels(m, str(pos)).inc(now_ - then)
            if self._log.spec is None:
                self._log.spec = before
        self._last = stats


@dataclass
class _SpecCounters:
    """Speculative decoding's counters, under vLLM's names."""

    drafts: Counter
    draft_tokens: Counter
    accepted_tokens: Counter
    accepted_per_pos: Counter  # labelled by position in the draft


@dataclass
class _LogWindow:
    """What happened since the last summary line."""

    start: float
    generated: int = 0
    spec: SpecDecodeStats | None = None  # the running totals at its start
