"""What vLLM's own OpenAI-server tests expect of request and response fields, against a fake
engine: stream usage, echo, token ids, logprob shapes, the fields vLLM always sends."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from pagoda.config import ServerConfig
from pagoda.entrypoints.openai.api_server import build_app

CHAT = [{"role": "user", "content": "Hi"}]


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


# ---- logprob shapes ---------------------------------------------------------------------------


def test_completion_logprobs_zero_is_the_sampled_token(client, tokenizer) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 0}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [" one", " two", " three"]
    assert logprobs["token_logprobs"] == [-0.25] * 3
    assert logprobs["top_logprobs"] == [{t: -0.25} for t in logprobs["tokens"]]
    assert logprobs["text_offset"] == [0, 4, 8]


def test_completion_top_logprobs_are_the_sampled_token_and_the_top_k(client) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "logprobs": 3, "stream": True}
    chunks = [e for e in sse_events(client.post("/v1/completions", json=body)) if e["choices"]]
    for chunk in chunks:
        logprobs = chunk["choices"][0]["logprobs"]
        (token,) = logprobs["tokens"]
        (top,) = logprobs["top_logprobs"]
        # The fake ranks the sampled token first, so it is one of the top 3.
        assert len(top) == 3 and top[token] == -0.25
        assert sorted(top.values(), reverse=True) == list(top.values())


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_return_tokens_as_token_ids(client, engine, tokenizer, route) -> None:
    body: dict = {"max_tokens": 2, "return_tokens_as_token_ids": True}
    if route == "/v1/completions":
        body |= {"prompt": "Hi", "logprobs": 1}
    else:
        body |= {"messages": CHAT, "logprobs": True, "top_logprobs": 1}
    choice = client.post(route, json=body).json()["choices"][0]
    ids = engine.script[:2]
    expected = [f"token_id:{t}" for t in ids]
    if route == "/v1/completions":
        assert choice["logprobs"]["tokens"] == expected
        assert [list(top) for top in choice["logprobs"]["top_logprobs"]] == [[e] for e in expected]
        assert choice["logprobs"]["text_offset"] == [0, len(expected[0])]
    else:
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == expected
        assert content[0]["bytes"] == list(expected[0].encode())
        assert [c["top_logprobs"][0]["token"] for c in content] == expected
    assert choice.get("text", choice.get("message", {}).get("content")) == tokenizer.decode(ids)


def test_return_tokens_as_token_ids_server_flag(engine) -> None:
    client = TestClient(build_app(engine, ServerConfig(return_tokens_as_token_ids=True)))
    body = {"prompt": "Hi", "max_tokens": 1, "logprobs": 0}
    tokens = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    assert tokens == [f"token_id:{engine.script[0]}"]
    body["return_tokens_as_token_ids"] = False  # the request's own choice wins
    tokens = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
    assert tokens == [" one"]


@pytest.mark.parametrize(
    "route, body, param, message",
    [
        ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs", "sample logprobs of 21"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
            "logprobs",
            "sample logprobs of 21",
        ),
        (
            "/v1/completions",
            {"prompt": "Hi", "prompt_logprobs": 21},
            "prompt_logprobs",
            "prompt logprobs of 21",
        ),
    ],
)
def test_max_logprobs(engine, client, route, body, param, message) -> None:
    error = assert_error(client.post(route, json=body), 400, param, message)
    assert error["message"].endswith("which is greater than max allowed: 20")
    roomy = TestClient(build_app(engine, ServerConfig(max_logprobs=21)))
    assert roomy.post(route, json=body | {"max_tokens": 1}).status_code == 200


# ---- echo -------------------------------------------------------------------------------------

PROMPT = "Hello there world"


def test_echo_logprobs_cover_the_prompt(client, engine, tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 1}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    prompt_ids = tokenizer.encode(PROMPT)
    ids = prompt_ids + engine.script[:2]
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT + " one two"
    assert logprobs["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    # The first prompt token has no context, so no logprob; each later one has its own.
    assert logprobs["token_logprobs"] == [None] + [-0.25] * (len(ids) - 1)
    assert logprobs["top_logprobs"][0] is None
    assert all(
        top[tok] == -0.25 for tok, top in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:])
    )
    offsets = [0]
    for token in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs["text_offset"] == offsets
    assert engine.last_params.prompt_logprobs == 1  # echo asked the engine for them


def test_echo_without_logprobs_asks_for_no_prompt_logprobs(client, engine) -> None:
    body = {"prompt": PROMPT, "max_tokens": 1, "echo": True}
    assert client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"] is None
    assert engine.last_params.prompt_logprobs is None


def test_echo_with_max_tokens_zero_scores_the_prompt_only(client, tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt_ids = tokenizer.encode(PROMPT)
    assert choice["text"] == PROMPT
    assert len(choice["logprobs"]["tokens"]) == len(prompt_ids)
    assert choice["logprobs"]["token_logprobs"][0] is None
    assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids)
    body["echo"] = False
    assert_error(client.post("/v1/completions", json=body), 400, "max_tokens")


def test_echo_stream_sends_the_prompt_and_its_logprobs_first(client, tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "echo": True, "logprobs": 0, "stream": True}
    chunks = [e["choices"][0] for e in sse_events(client.post("/v1/completions", json=body))]
    prompt_ids = tokenizer.encode(PROMPT)
    assert chunks[0]["text"] == PROMPT + " one"
    assert len(chunks[0]["logprobs"]["tokens"]) == len(prompt_ids) + 1
    assert chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == PROMPT + " one two three"
    # text_offset runs on across chunks, as in one response
    offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
    tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_with_n_covers_the_prompt_once_per_choice(client, tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 0, "n": 2}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    n_prompt = len(tokenizer.encode(PROMPT))
    assert [len(c["logprobs"]["tokens"]) for c in choices] == [n_prompt + 2] * 2
    body = {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0, "n": 2}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert [len(c["prompt_logprobs"]) for c in choices] == [n_prompt] * 2


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_cannot_stream(client, route) -> None:
    body: dict = {"max_tokens": 1, "stream": True, "prompt_logprobs": 1}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    assert_error(client.post(route, json=body), 400, "prompt_logprobs", "stream=True")


ASSISTANT_START = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "My favourite colour is"},
]


def test_chat_echo_prepends_the_last_assistant_message(client) -> None:
    body = {
        "messages": ASSISTANT_START,
        "max_tokens": 2,
        "echo": True,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == "My favourite colour is one two"
    body["echo"] = False
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == " one two"
    # The last message is the user's: nothing to echo.
    body = {"messages": CHAT, "max_tokens": 2, "echo": True}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == " one two"


def test_chat_echo_stream(client) -> None:
    body = {
        "messages": ASSISTANT_START,
        "max_tokens": 2,
        "echo": True,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "stream": True,
        "n": 2,
    }
    events = sse_events(client.post("/v1/chat/completions", json=body))
    for index in (0, 1):
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"][0]["index"] == index]
        assert deltas[0]["role"] == "assistant"
        assert deltas[1]["content"] == "My favourite colour is"
        text = "".join(d.get("content") or "" for d in deltas)
        assert text.startswith("My favourite colour is")


def test_chat_prompt_logprobs(client, engine) -> None:
    body = {"messages": CHAT, "max_tokens": 1, "prompt_logprobs": 1}
    r = client.post("/v1/chat/completions", json=body).json()
    prompt_logprobs = r["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == r["usage"]["prompt_tokens"]
    for entry in prompt_logprobs[1:]:
        ((token_id, logprob),) = entry.items()
        assert logprob["logprob"] == -0.25 and logprob["rank"] == 1
        assert isinstance(logprob["decoded_token"], str)
    # echo asks for prompt logprobs as many as top_logprobs, as vLLM does
    body = {"messages": CHAT, "max_tokens": 1, "echo": True, "logprobs": True, "top_logprobs": 2}
    client.post("/v1/chat/completions", json=body)
    assert engine.last_params.prompt_logprobs == 2


# ---- token ids and the fields vLLM always sends ---------------------------------------------


def test_completion_fields_vllm_sends_as_null(client) -> None:
    body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).json()
    choice = body["choices"][0]
    for field in ("prompt_token_ids", "token_ids", "prompt_logprobs", "logprobs", "stop_reason"):
        assert field in choice and choice[field] is None, field
    assert "system_fingerprint" in body


def test_chat_fields_vllm_and_openai_send_as_null(client) -> None:
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}).json()
    message = body["choices"][0]["message"]
    # OpenAI's schema requires refusal (null when the model did not refuse).
    assert message["role"] == "assistant" and "refusal" in message and message["refusal"] is None
    assert body["choices"][0]["token_ids"] is None
    for field in ("prompt_token_ids", "prompt_logprobs", "system_fingerprint"):
        assert field in body and body[field] is None, field


def test_completion_return_token_ids(client, engine, tokenizer) -> None:
    body = {"prompt": ["Hi", "Hello there"], "max_tokens": 2, "return_token_ids": True}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["prompt_token_ids"] for c in choices] == [
        tokenizer.encode("Hi"),
        tokenizer.encode("Hello there"),
    ]
    assert [c["token_ids"] for c in choices] == [engine.script[:2]] * 2
    body |= {"stream": True, "prompt": "Hi"}
    chunks = [e["choices"][0] for e in sse_events(client.post("/v1/completions", json=body))]
    assert chunks[0]["prompt_token_ids"] == tokenizer.encode("Hi")
    assert all(c.get("prompt_token_ids") is None for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == engine.script[:2]


def test_chat_return_token_ids(client, engine) -> None:
    body = {"messages": CHAT, "max_tokens": 2, "return_token_ids": True}
    r = client.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["token_ids"] == engine.script[:2]
    assert len(r["prompt_token_ids"]) == r["usage"]["prompt_tokens"]
    events = sse_events(client.post("/v1/chat/completions", json=body | {"stream": True}))
    assert events[0]["prompt_token_ids"] == r["prompt_token_ids"]
    assert [t for e in events[1:] for t in e["choices"][0].get("token_ids") or []] == (
        engine.script[:2]
    )


def test_logit_bias_error_names_every_bad_key_and_the_vocabulary(client, tokenizer) -> None:
    vocab = tokenizer.vocab_size
    bias = {"5": 1, str(vocab): 1, str(vocab + 7): 1, "-1": 1}
    r = client.post("/v1/completions", json={"prompt": "Hi", "logit_bias": bias})
    error = assert_error(r, 400, "logit_bias")
    assert f"[{vocab}, {vocab + 7}, -1]" in error["message"]
    assert f"Vocabulary size: {vocab}" in error["message"]
    r = client.post("/v1/completions", json={"prompt": "Hi", "logit_bias": {"a": 1, "--1": 2}})
    assert "'a', '--1'" in assert_error(r, 400, "logit_bias")["message"]


def test_error_code_is_the_status_as_vllm_sends_it(client) -> None:
    """vLLM's ErrorInfo.code is the HTTP status as an integer; the openai client reads any
    JSON value there (APIError.code), so a client of vLLM sees the same."""
    error = client.post("/v1/completions", json={"prompt": "Hi", "n": 0}).json()["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"


# ---- request fields that change the result ----------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_beam_search_is_refused_not_ignored(client, route) -> None:
    body: dict = {"max_tokens": 1, "use_beam_search": True}
    body |= {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    assert_error(client.post(route, json=body), 400, "use_beam_search", "beam search")
    body["use_beam_search"] = False
    assert client.post(route, json=body).status_code == 200


def test_truncate_prompt_tokens(client, engine, tokenizer) -> None:
    long = "one two three four five six seven eight nine ten " * 20  # > 128 tokens
    ids = tokenizer.encode(long)
    assert len(ids) > engine.config.max_model_len
    assert_error(client.post("/v1/completions", json={"prompt": long, "max_tokens": 1}), 400)
    body = {"prompt": long, "max_tokens": 1, "truncate_prompt_tokens": 10, "echo": True}
    r = client.post("/v1/completions", json=body).json()
    assert r["usage"]["prompt_tokens"] == 10
    assert r["choices"][0]["text"] == tokenizer.decode(ids[-10:]) + " one"  # keeps the end
    body["truncation_side"] = "right"
    r = client.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == tokenizer.decode(ids[:10]) + " one"  # keeps the start
    body["truncate_prompt_tokens"] = 129
    assert_error(
        client.post("/v1/completions", json=body),
        400,
        "truncate_prompt_tokens",
        "greater than max_model_len (128)",
    )
    # -1: to the context length, which leaves no room for output
    body["truncate_prompt_tokens"] = -1
    assert_error(client.post("/v1/completions", json=body), 400, None, "context length")
    chat = {"messages": [{"role": "user", "content": long}], "max_tokens": 1}
    r = client.post("/v1/chat/completions", json=chat | {"truncate_prompt_tokens": 20})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 20


def test_continue_final_message_and_generation_prompt_exclude_each_other(client) -> None:
    body = {
        "messages": ASSISTANT_START,
        "continue_final_message": True,
        "add_generation_prompt": True,
        "max_tokens": 1,
    }
    for route in ("/v1/chat/completions", "/tokenize"):
        assert_error(client.post(route, json=body), 400, None, "Cannot set both")
    del body["add_generation_prompt"]  # its default gives way
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_tokenize_continue_final_message_and_token_strs(client, tokenizer) -> None:
    body = {"messages": ASSISTANT_START, "add_generation_prompt": False}
    closed = client.post("/tokenize", json=body).json()["tokens"]
    body["continue_final_message"] = True
    r = client.post("/tokenize", json=body).json()
    open_ = r["tokens"]
    # The open message ends at its content: no end-of-turn after it.
    assert tokenizer.decode(open_).endswith("My favourite colour is")
    assert len(open_) < len(closed) and closed[: len(open_)] == open_
    assert r["token_strs"] is None
    r = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["token_strs"] == [tokenizer.id_to_token(t) for t in r["tokens"]]
    assert "".join(r["token_strs"]).replace("Ġ", " ").endswith("Hello world")


def test_allowed_token_ids_reach_the_engine_and_are_checked(client, engine, tokenizer) -> None:
    body = {"prompt": "Hi", "max_tokens": 1, "allowed_token_ids": [5, 6]}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert engine.last_params.allowed_token_ids == [5, 6]
    chat = {"messages": CHAT, "max_tokens": 1, "allowed_token_ids": [7]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert engine.last_params.allowed_token_ids == [7]
    body["allowed_token_ids"] = []
    assert_error(client.post("/v1/completions", json=body), 400, "allowed_token_ids", "empty")
    body["allowed_token_ids"] = [5, tokenizer.vocab_size]
    assert_error(
        client.post("/v1/completions", json=body), 400, "allowed_token_ids", "out-of-vocab"
    )


def test_logprob_token_ids(client, engine, tokenizer) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "logprobs": 1, "logprob_token_ids": [11, 12]}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert engine.last_params.logprob_token_ids == [11, 12]
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        decoded = {tokenizer.decode([t], skip_special_tokens=False) for t in (11, 12)}
        assert set(top) == {token} | decoded  # the sampled token and the asked ones
    chat = {"messages": CHAT, "max_tokens": 1, "logprobs": True, "logprob_token_ids": [11]}
    content = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"][
        "content"
    ]
    assert tokenizer.decode([11], skip_special_tokens=False) in [
        t["token"] for t in content[0]["top_logprobs"]
    ]
    for bad, match in [
        ({"logprob_token_ids": []}, "must not be an empty list"),
        ({"logprobs": None}, "`logprobs` must be set"),
        ({"logprob_token_ids": [tokenizer.vocab_size]}, "out-of-vocab"),
        ({"echo": True, "max_tokens": 0}, "echo"),
    ]:
        r = client.post("/v1/completions", json=body | bad)
        assert_error(r, 400, "logprob_token_ids", match)
    r = client.post("/v1/chat/completions", json=chat | {"logprobs": False})
    assert_error(r, 400, "logprob_token_ids", "must be set to true")
