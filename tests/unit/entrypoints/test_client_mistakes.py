"""A client's mistake is a 4xx naming the field, never a 500, and leaves nothing behind."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngineClient
from fastapi.testclient import TestClient

from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def client(engine) -> TestClient:
    app = build_app(engine, ServerConfig(max_n=8, max_prompts_per_request=16))
    return TestClient(app, raise_server_exceptions=False)


def post_raw(client: TestClient, path: str, body: str):
    """Posts a JSON text as is: lone surrogates ("\\ud800") are legal JSON escapes."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def assert_error(response, status: int, param: str | None, match: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["param"] == param, error
    assert match.lower() in error["message"].lower(), error


def assert_nothing_left(engine: FakeEngineClient) -> None:
    assert not engine.processor.has_unfinished() and not engine.processor.engine_ids


# ---- seeds and other integers the engine's wire cannot carry --------------------------------


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30])
def test_seed_outside_int64_is_400(client, engine, seed) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": "Hi", "seed": seed}),
        ("/v1/chat/completions", {"messages": USER, "seed": seed}),
    ):
        assert_error(client.post(path, json=body), 400, "seed", "[-2**63, 2**63 - 1]")
    assert_nothing_left(engine)


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0, -1])
def test_seed_at_the_ends_of_int64_is_accepted(client, engine, seed) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "seed": seed, "n": 2})
    assert r.status_code == 200, r.text
    assert engine.last_params is not None and engine.last_params.seed == seed


def test_top_k_beyond_int64_is_400(client) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "top_k": 10**20})
    assert_error(r, 400, "top_k")


# ---- strings the tokenizer or the chat template cannot take ---------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", '{"prompt": ["a", "b\\udfffc"]}', "prompt.1"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
        ("/v1/chat/completions", '{"messages": [{"role": "\\ud800", "content": "x"}]}', None),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "x", "name": "\\udc00"}]}',
            None,
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            None,
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "x"}], '
            '"chat_template_kwargs": {"k": ["\\ud800"]}}',
            "chat_template_kwargs",
        ),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
        ("/v1/completions", '{"prompt": "Hi", "model": "\\ud800"}', "model"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(client, engine, path, body, param) -> None:
    r = post_raw(client, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if param is None:  # somewhere in messages.N
        assert error["param"].startswith("messages.0"), error
    else:
        assert error["param"] == param, error
    assert "surrogate" in error["message"]
    assert_nothing_left(engine)


def test_stream_with_a_lone_surrogate_is_400_before_streaming(client) -> None:
    r = post_raw(client, "/v1/completions", '{"prompt": "\\ud800", "stream": true}')
    assert_error(r, 400, "prompt", "surrogate")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": 1}, "chat_template_kwargs"),
        ({"add_generation_prompt": 1}, "chat_template_kwargs"),
        ({"bos_token": [1]}, "chat_template_kwargs"),
        ({"chat_template": "{{ x }}"}, "chat_template_kwargs"),
    ],
)
def test_chat_template_kwargs_that_clash_are_400(client, kwargs, param) -> None:
    r = client.post("/v1/chat/completions", json={"messages": USER, "chat_template_kwargs": kwargs})
    assert_error(r, 400, param)


def test_a_template_that_raises_on_odd_shapes_is_400(engine) -> None:
    # Whatever a template does with the request's shapes (here: adds a list to a string),
    # its failure is the request's fault.
    template = "{{ messages[0]['content'] + tools }}"
    client = TestClient(build_app(engine, ServerConfig(chat_template=template)))
    fields = {"messages": USER, "tools": [{"a": 1}], "tool_choice": "none"}  # none: unchecked
    r = client.post("/v1/chat/completions", json=fields)
    assert_error(r, 400, "messages", "chat template")


# ---- many prompts in one request ------------------------------------------------------------


def test_too_many_prompts_is_400_at_once(client, engine) -> None:
    r = client.post("/v1/completions", json={"prompt": ["Hi"] * 17, "max_tokens": 1})
    assert_error(r, 400, "prompt", "at most 16")
    r = client.post("/v1/completions", json={"prompt": [[28]] * 17, "max_tokens": 1})
    assert_error(r, 400, "prompt", "at most 16")
    assert engine.last_params is None  # nothing reached the engine
    r = client.post("/v1/completions", json={"prompt": ["Hi"] * 16, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 16
    assert_nothing_left(engine)


# ---- floats that would turn into garbage; nulls that mean "default" --------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "Infinity"),
        ("temperature", "1e308"),
        ("temperature", "NaN"),
        ("temperature", "2.5"),
        ("repetition_penalty", "Infinity"),
        ("repetition_penalty", "1e308"),
        ("repetition_penalty", "1e-45"),
        ("top_p", "NaN"),
        ("min_p", "Infinity"),
        ("presence_penalty", "-Infinity"),
        ("frequency_penalty", "NaN"),
    ],
)
def test_non_finite_or_overflowing_floats_are_400(client, field, value) -> None:
    for path, head in (("/v1/completions", '"prompt": "Hi"'), ("/v1/chat/completions", None)):
        if head is None:
            head = '"messages": [{"role": "user", "content": "Hi"}]'
        r = post_raw(client, path, f'{{{head}, "{field}": {value}}}')
        assert_error(r, 400, field)


def test_logit_bias_value_not_finite_is_400(client) -> None:
    r = post_raw(client, "/v1/completions", '{"prompt": "Hi", "logit_bias": {"5": Infinity}}')
    assert_error(r, 400, "logit_bias")


def test_nulls_mean_the_default(client, engine) -> None:
    nulls = dict.fromkeys(
        [
            "model",
            "stream",
            "stream_options",
            "echo",
            "n",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "min_tokens",
            "ignore_eos",
            "skip_special_tokens",
            "include_stop_str_in_output",
            "stop",
            "stop_token_ids",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "seed",
            "logit_bias",
            "user",
            "suffix",
            "best_of",
            "add_special_tokens",
            "prompt_logprobs",
        ]
    )
    # max_tokens null is a value of its own: up to the context length (as in vLLM)
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": None})
    assert r.status_code == 200 and engine.last_params.max_tokens == 128 - 1
    r = client.post("/v1/completions", json={"prompt": "Hi", **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].startswith(" one two three")
    assert r.json()["usage"]["completion_tokens"] == 16
    params = engine.last_params
    assert params is not None and params.n == 1 and params.max_tokens == 16
    assert params.temperature == 1.0 and params.presence_penalty == 0.0

    chat_nulls = {
        k: None
        for k in (
            "stream",
            "n",
            "echo",
            "logprobs",
            "top_logprobs",
            "presence_penalty",
            "add_generation_prompt",
            "continue_final_message",
            "max_completion_tokens",
            "chat_template_kwargs",
            "response_format",
            "tools",
            "tool_choice",
        )
    }
    messages = [{"role": "user", "content": "Hi", "name": None}]
    r = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **chat_nulls}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == " one two"
    r = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "stream": True, "stream_options": {"include_usage": None}},
    )
    assert r.status_code == 200 and "data: [DONE]" in r.text


def test_a_null_where_a_value_is_required_is_400(client) -> None:
    assert_error(client.post("/v1/completions", json={"prompt": None}), 400, "prompt")
    assert_error(client.post("/v1/chat/completions", json={"messages": None}), 400, "messages")
