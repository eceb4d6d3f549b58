"""The HTTP layer against a fake engine: shapes, streaming, usage, every 4xx, auth, CORS."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from pagoda.config import ServerConfig
from pagoda.engine.messages import EngineOutputs, EngineRequest, SchedulerStats
from pagoda.entrypoints.metrics import Metrics
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import SamplingParams


@pytest.fixture
def client(engine) -> TestClient:
    return TestClient(build_app(engine, ServerConfig(max_n=8)))


def assert_error(response, status: int, param: str | None = None, match: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param
    assert match.lower() in error["message"].lower()
    return error


def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# ---- happy paths --------------------------------------------------------------------------


def test_models(client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "fake-model"
    assert body["data"][0]["max_model_len"] == 128


def test_completion_with_usage(client) -> None:
    r = client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": "Hi", "max_tokens": 3}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " one two three"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 3,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert "x-request-id" not in r.headers  # only with --enable-request-id-headers


def test_completion_prompt_forms_and_echo(client) -> None:
    r = client.post("/v1/completions", json={"prompt": ["A", "B"], "max_tokens": 2, "n": 2})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert r.json()["usage"]["completion_tokens"] == 8
    r = client.post("/v1/completions", json={"prompt": [[19556], [19556, 28]], "max_tokens": 1})
    assert len(r.json()["choices"]) == 2
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 1, "echo": True})
    assert r.json()["choices"][0]["text"] == "Hello one"


def test_completion_stream_format(client) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "prompt": "Hi",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == " one two three four"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_chat_and_its_stream(client, engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": messages,
            "max_completion_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == " one two"
    assert engine.last_params.max_tokens == 2 and engine.last_params.logprobs == 2
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "stream": True}
    )
    events = sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in events) == " one two three"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_stop_string_is_cut(client) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "stop": " four"})
    choice = r.json()["choices"][0]
    assert choice["text"] == " one two three"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " four"


def test_tokenize_detokenize(client, tokenizer) -> None:
    r = client.post("/tokenize", json={"prompt": "Hello world"})
    tokens = r.json()["tokens"]
    assert tokens == tokenizer.encode("Hello world") and r.json()["count"] == len(tokens)
    assert client.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "Hello world"
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["count"] > 5


def test_operational_routes(client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/ping").status_code == 200
    assert client.get("/version").json()["version"]
    assert client.get("/load").json() == {"server_load": 0}
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    metrics = client.get("/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
    ):
        assert name in metrics


# ---- bad input ------------------------------------------------------------------------------


def test_malformed_json(client) -> None:
    r = client.post(
        "/v1/completions", content=b'{"prompt": "Hi",', headers={"content-type": "application/json"}
    )
    assert_error(r, 400, match="invalid JSON")


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        ({"prompt": "Hi", "temperature": "hot"}, "temperature", "number"),
        ({"prompt": 5}, "prompt", ""),
        ({}, "prompt", "field required"),
        ({"prompt": "Hi", "temperature": -1}, "temperature", ">= 0"),
        ({"prompt": "Hi", "top_p": 0}, "top_p", "(0, 1]"),
        ({"prompt": "Hi", "top_k": -5}, "top_k", ""),
        ({"prompt": "Hi", "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ({"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": "Hi", "max_tokens": 500}, "max_tokens", "maximum context length is 128"),
        ({"prompt": "Hi " * 200}, "prompt", "maximum context length"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[999999999]]}, "prompt", "out of vocabulary"),
        ({"prompt": "Hi", "n": 1000}, "n", "at most 8"),
        ({"prompt": "Hi", "n": 0}, "n", "at least 1"),
        ({"prompt": "Hi", "logit_bias": {"abc": 1}}, "logit_bias", "not token ids"),
        ({"prompt": "Hi", "logit_bias": {"999999999": 1}}, "logit_bias", "out-of-vocab token ids"),
        ({"prompt": "Hi", "logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
        ({"prompt": "Hi", "logprobs": 50}, "logprobs", "max allowed: 20"),
        ({"prompt": "Hi", "suffix": "x"}, "suffix", "not supported"),
        ({"prompt": "Hi", "min_tokens": 9, "max_tokens": 3}, "min_tokens", "<= max_tokens"),
        ({"prompt": "Hi", "stop": [""]}, "stop", "empty"),
    ],
)
def test_completion_bad_input(client, body, param, match) -> None:
    assert_error(client.post("/v1/completions", json=body), 400, param, match)


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        ({"messages": []}, "messages", "empty"),
        ({"messages": "hi"}, "messages", ""),
        ({"messages": [{"content": "hi"}]}, "messages.0.role", "field required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
            "only text",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
            "top_logprobs",
            "requires logprobs",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
            "tool_choice",
            "`tools` must be set",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "yaml"},
            },
            "response_format",
            "unknown type",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000},
            "max_tokens",
            "maximum context length",
        ),
    ],
)
def test_chat_bad_input(client, body, param, match) -> None:
    assert_error(client.post("/v1/chat/completions", json=body), 400, param, match)


def test_unknown_model_is_404(client) -> None:
    r = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "Hi"})
    assert_error(r, 404, "model", "does not exist")
    r = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
    )
    assert_error(r, 404, "model")


def test_unknown_route_and_method(client) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_bad_requests_leave_the_server_healthy(client) -> None:
    for _ in range(3):
        client.post(
            "/v1/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}
        )
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and client.get("/health").status_code == 200


# ---- engine states, auth, CORS ----------------------------------------------------------------


def test_dead_engine_is_5xx_and_unhealthy(client, engine) -> None:
    engine.dead = True
    r = client.post("/v1/completions", json={"prompt": "Hi"})
    assert_error(r, 500, match="engine is dead")
    assert client.get("/health").status_code == 503
    # A stream that cannot start is refused before it starts, with the same 5xx.
    r = client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert_error(r, 500, match="engine is dead")
    chat = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    assert_error(client.post("/v1/chat/completions", json=chat), 500, match="engine is dead")


def test_draining_refuses_new_work(client) -> None:
    client.app.server_state.draining = True
    assert_error(client.post("/v1/completions", json={"prompt": "Hi"}), 503, match="shutting down")
    assert client.get("/health").status_code == 503


def test_api_key(engine) -> None:
    client = TestClient(build_app(engine, ServerConfig(api_keys=("k1", "k2"))))
    body = {"prompt": "Hi", "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=body), 401)
    bad = {"Authorization": "Bearer nope"}
    assert_error(client.post("/v1/completions", json=body, headers=bad), 401)
    for key in ("k1", "k2"):
        ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert client.get("/v1/models").status_code == 401
    for open_route in ("/health", "/metrics", "/version", "/ping"):
        assert client.get(open_route).status_code == 200


def test_cors(engine) -> None:
    client = TestClient(build_app(engine, ServerConfig(allowed_origins=("https://app.example",))))
    preflight = client.options(
        "/v1/completions",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_request_id_header_only_when_enabled(client, engine) -> None:
    # vLLM sends X-Request-Id only with --enable-request-id-headers.
    assert "x-request-id" not in client.get("/health", headers={"X-Request-Id": "abc"}).headers
    enabled = TestClient(build_app(engine, ServerConfig(enable_request_id_headers=True)))
    r = enabled.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(enabled.get("/health").headers["x-request-id"]) == 32


def test_root_path_serves_prefixed_and_unprefixed_paths(engine) -> None:
    client = TestClient(build_app(engine, ServerConfig(root_path="/llm", api_keys=("k",))))
    auth = {"Authorization": "Bearer k"}
    for path in ("/llm/v1/models", "/v1/models"):
        assert client.get(path, headers=auth).status_code == 200, path
        assert client.get(path).status_code == 401, path
    body = {"prompt": "Hi", "max_tokens": 2}
    assert client.post("/llm/v1/completions", json=body, headers=auth).status_code == 200


def test_invocations_dispatches_on_the_body(client) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = client.post("/invocations", json=chat)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    r = client.post("/invocations", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    streamed = client.post("/invocations", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    assert sse_events(streamed)[-1]["object"] == "text_completion"
    assert_error(client.post("/invocations", json={"input": "Hi"}), 400, match="suitable handler")
    r = client.post("/invocations", content=b"{", headers={"content-type": "application/json"})
    assert_error(r, 400)
    # A chat body with a bad field is that request's 400, not a fall-through to completions.
    bad = {**chat, "temperature": -1}
    assert_error(client.post("/invocations", json=bad), 400, param="temperature")


def test_tokenizer_info_only_when_enabled(client, engine, tokenizer) -> None:
    assert client.get("/tokenizer_info").status_code == 404
    enabled = TestClient(build_app(engine, ServerConfig(enable_tokenizer_info_endpoint=True)))
    info = enabled.get("/tokenizer_info").json()
    assert info["tokenizer_class"]
    assert info["eos_token"] == tokenizer.eos_token
    assert info["model_max_length"] == engine.config.max_model_len
    assert info["chat_template"] == tokenizer.chat_template


def test_orca_load_header_when_asked(client) -> None:
    body = {"prompt": "Hi", "max_tokens": 2}
    assert "endpoint-load-metrics" not in client.post("/v1/completions", json=body).headers
    r = client.post("/v1/completions", json=body, headers={"endpoint-load-metrics-format": "TEXT"})
    text = r.headers["endpoint-load-metrics"]
    assert text.startswith("TEXT ") and "named_metrics.kv_cache_usage_perc=" in text
    assert "named_metrics.num_requests_waiting=" in text
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers={"endpoint-load-metrics-format": "json"},
    )
    kind, _, payload = r.headers["endpoint-load-metrics"].partition(" ")
    assert kind == "JSON"
    assert set(json.loads(payload)["named_metrics"]) == {
        "kv_cache_usage_perc",
        "num_requests_waiting",
    }


def test_request_meeting_a_dead_engine_reports_it_at_once(client, engine) -> None:
    reported: list[bool] = []

    async def on_engine_dead() -> None:
        reported.append(engine.errored)

    client.app.server_state.on_engine_dead = on_engine_dead
    engine.dead = True
    client.post("/v1/completions", json={"prompt": "Hi"})
    assert reported == [True]
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert reported == [True, True]


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_cache_config_info(client, engine) -> None:
    config = engine.config
    text = client.get("/metrics").text
    labels = (
        f'block_size="{config.block_size}",cache_dtype="auto",'
        f'enable_prefix_caching="{config.enable_prefix_caching}",'
        f'num_gpu_blocks="{config.num_gpu_blocks}"'
    )
    assert f"vllm:cache_config_info{{{labels}}} 1.0" in text


def test_scheduler_stats_metrics(client, engine) -> None:
    stats = SchedulerStats(num_running=1, num_waiting=3, num_preemptions=2)
    for stat_logger in engine.stat_loggers:
        stat_logger.step(EngineOutputs([], stats=stats), [])
    text = client.get("/metrics").text
    # Pagoda's scheduler skips no waiting request: each waits for room (vLLM's "capacity").
    by_reason = 'vllm:num_requests_waiting_by_reason{model_name="fake-model",reason="%s"}'
    assert metric_value(text, by_reason % "capacity") == 3
    assert metric_value(text, by_reason % "deferred") == 0
    assert metric_value(text, "vllm:num_preemptions_total") == 2


def test_params_n_of_a_request_its_stop_string_ended(engine) -> None:
    """The engine client forgets a request a stop string ended before the step that finishes it."""
    metrics = Metrics(engine.config)
    params = SamplingParams(max_tokens=4)
    metrics.request_added(EngineRequest("r", [1, 2], params, [2], 0.0))
    metrics.request_aborted(["r"])
    done = CompletionOutput(0, "a", [5], finish_reason="stop", stop_reason="b")
    metrics.step(
        EngineOutputs([]),
        [RequestOutput("r", None, [1, 2], [done], True, 0, None, {"arrival_time": 0.0})],
    )
    metrics.request_added(EngineRequest("gone", [1, 2], params, [2], 0.0))
    metrics.request_aborted(["gone"])  # the client left: never finishes
    metrics.step(EngineOutputs([]), [])
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, "vllm:request_params_n_count") == 1
    assert metrics._num_samples == {}


def test_per_request_metrics(client) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "n": 2}
    assert client.post("/v1/completions", json=body).status_code == 200
    text = client.get("/metrics").text
    # Each of the n samples is one engine request, as in vLLM.
    assert metric_value(text, "vllm:request_prompt_tokens_count") == 2
    assert metric_value(text, "vllm:request_prompt_tokens_sum") == 2  # "Hi" is one token
    assert metric_value(text, "vllm:request_generation_tokens_sum") == 6
    assert metric_value(text, "vllm:request_params_max_tokens_sum") == 6
    for name in (
        "vllm:request_inference_time_seconds_count",
        "vllm:request_prefill_time_seconds_count",
        "vllm:request_decode_time_seconds_count",
        "vllm:request_time_per_output_token_seconds_count",
    ):
        assert metric_value(text, name) == 2, name
    # n is the client request's, observed once, not per sample.
    assert metric_value(text, "vllm:request_params_n_count") == 1
    assert metric_value(text, "vllm:request_params_n_sum") == 2
    # Each finished sample: the fake engine never preempts.
    assert metric_value(text, "vllm:request_num_preemptions_count") == 2
    assert metric_value(text, "vllm:request_num_preemptions_sum") == 0
    # Observed from the engine's step stats, which the fake engine does not send.
    assert "# TYPE vllm:iteration_tokens_total histogram" in text


def test_request_success_has_every_reason_from_the_start(client) -> None:
    """As vLLM's: a router or dashboard reading the counter before any request finished."""
    text = client.get("/metrics").text
    for reason in ("stop", "length", "abort"):
        line = next(
            line
            for line in text.splitlines()
            if line.startswith("vllm:request_success_total{")
            and f'finished_reason="{reason}"' in line
        )
        assert float(line.rsplit(" ", 1)[1]) == 0.0


def test_every_model_labelled_series_is_there_from_the_start(client) -> None:
    """The prefix-cache counters a router reads, the gauges and the histograms: at 0 before the
    server has served anything (a server the router has not chosen yet is read too)."""
    text = client.get("/metrics").text
    for name in (
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_count",
        "vllm:iteration_tokens_total_count",
    ):
        assert metric_value(text, name) == 0, name
