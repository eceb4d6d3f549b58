"""What vLLM's own OpenAI-server tests expect of request and response fields, against a fake
engine: stream usage, echo, token ids, logprob shapes, the fields vLLM always sends."""

from __future__ import annotations

import json

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient

from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app
from pagoda.tokenizer import Tokenizer

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tokenizer(default_model_path) -> Tokenizer:
    return Tokenizer.from_path(default_model_path)


@pytest.fixture
def engine(tokenizer) -> FakeEngineClient:
    return FakeEngineClient(tokenizer)


@pytest.fixture
def client(engine) -> TestClient:
    return TestClient(build_app(engine, ServerConfig()))


def assert_error(response, status: int, param: str | None = None, match: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param
    assert match.lower() in error["message"].lower(), error["message"]
    return error


def sse_events(response) -> list:
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# ---- stream usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_on_every_chunk(client, route) -> None:
    body: dict = {"max_tokens": 3, "stream": True}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    events = sse_events(client.post(route, json=body))
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    prompt_tokens = last["usage"]["prompt_tokens"]
    assert prompt_tokens > 0
    assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    seen = []
    for chunk in chunks:
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        seen.append(usage["completion_tokens"])
    assert seen == sorted(seen) and seen[-1] == 3  # counts so far, growing to the total


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_usage_only_at_the_end_without_continuous_stats(client, route) -> None:
    body: dict = {"max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    *chunks, last = sse_events(client.post(route, json=body))
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert last["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_without_stream_is_400(client, route) -> None:
    body: dict = {"max_tokens": 3, "stream_options": {"include_usage": True}}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    assert_error(client.post(route, json=body), 400, "stream_options", "stream=True")
    body["stream"] = False
    assert_error(client.post(route, json=body), 400, "stream_options", "stream=True")
    body["stream_options"] = None  # null is no stream options at all
    assert client.post(route, json=body).status_code == 200


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_force_include_usage(engine, route) -> None:
    client = TestClient(build_app(engine, ServerConfig(enable_force_include_usage=True)))
    body: dict = {"max_tokens": 2, "stream": True}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    *chunks, last = sse_events(client.post(route, json=body))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2
    assert all(chunk["usage"] is not None for chunk in chunks)


def test_usage_reports_cached_tokens_as_an_object(client) -> None:
    usage = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    usage = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()[
        "usage"
    ]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
